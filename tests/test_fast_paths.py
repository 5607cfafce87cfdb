"""The trainer's shortcuts equal the long way: prefix-shared prompt prefill in sampling, and behaviour
log-probs of the first minibatch taken from its own update forward pass."""

from __future__ import annotations

import copy

import pytest
import torch

from mhpo.generation.prompts import PromptEncoder
from mhpo.generation.rollout import repeat_rows, sample
from mhpo.models.tiny import tiny_qwen2
from mhpo.models.tokenizer import build_char_tokenizer
from mhpo.tasks.base import Example
from mhpo.trainer.config import ObjectiveConfig, UpdateConfig
from mhpo.trainer.update import UpdateBatch, minibatches, policy_update, rollout_logprobs

G = 4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    tok = build_char_tokenizer()
    model = tiny_qwen2(tok, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=3)
    enc = PromptEncoder(tok, chat=False)
    # Different prompt lengths: left padding inside the shared prefill.
    prompts = enc([Example(p, "") for p in ("12+7=", "3+4=", "100+200=", "9=")])
    return model, tok, prompts


def _sample(model, tok, prompts, shared: bool, do_sample: bool, seed: int = 0, batch_size=None):
    torch.manual_seed(seed)
    if shared:  # group_size > 1: the prompts' cache is computed once and repeated
        return sample(
            model,
            tok,
            prompts,
            group_size=G,
            max_new_tokens=6,
            eos_ids=[tok.eos_token_id],
            do_sample=do_sample,
            batch_size=batch_size,
        )
    rows = repeat_rows(prompts, G)  # the long way: every completion prefills its own prompt
    whole_groups = batch_size and max(batch_size // G, 1) * G  # the shared path batches whole groups
    return sample(
        model,
        tok,
        rows,
        group_size=1,
        max_new_tokens=6,
        eos_ids=[tok.eos_token_id],
        do_sample=do_sample,
        batch_size=whole_groups,
    )


@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("batch_size", [None, 8, 6])
def test_shared_prefill_gives_the_same_rollout(setup, do_sample, batch_size, monkeypatch):
    model, tok, prompts = setup
    widths = []  # input_ids.shape[1] of every forward of the whole model (the shared prefix runs in its base)

    def spy(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    forward = model.forward
    monkeypatch.setattr(model, "forward", spy)
    a = _sample(model, tok, prompts, True, do_sample, batch_size=batch_size)
    assert widths and set(widths) == {1}, f"the shared prefill fell back to whole prompts: widths {widths}"
    widths.clear()
    b = _sample(model, tok, prompts, False, do_sample, batch_size=batch_size)
    assert max(widths) > 1  # the long way prefills every row's whole prompt
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.attention_mask, b.attention_mask)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert a.completions == b.completions
    assert len(a) == len(prompts["input_ids"]) * G


def _update(model, rollout, fill_first: bool, num_minibatches=2, epochs=2, micro=None):
    model = copy.deepcopy(model)
    # SGD: Adam would turn float-rounding noise in gradients that are exactly zero in theory (the
    # key bias: softmax ignores a shift shared by all keys) into full-size steps of random sign.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    n = len(rollout)
    adv = torch.linspace(-1, 1, n)
    torch.manual_seed(7)  # the same minibatches either way: drawn here, or by the update itself
    first = None
    if fill_first:
        first = minibatches(n, num_minibatches)
        old = torch.zeros(rollout.completion_mask.shape)
        ent = torch.zeros_like(old)
        rest = torch.ones(n, dtype=torch.bool)
        rest[first[0]] = False
        rest = rest.nonzero().squeeze(-1)
        old[rest], ent[rest] = rollout_logprobs(model, rollout.select(rest, trim=False), temperature=1.0, entropy=True)
    else:
        old, ent = rollout_logprobs(model, rollout, temperature=1.0, entropy=True, micro_batch_size=micro)
    given = old.clone()
    batch = UpdateBatch(rollout, old, adv, norm_length=6.0, first_epoch=first)
    update = UpdateConfig(num_minibatches=num_minibatches, epochs=epochs, micro_batch_size=micro, max_grad_norm=1.0)
    result = policy_update(model, opt, batch, ObjectiveConfig(name="mhpo", agg="token-mean"), update)
    assert torch.equal(batch.old_logp, given)  # the update never writes into the caller's tensors
    if fill_first:
        old, ent = old.clone(), ent.clone()
        old[result.first_rows], ent[result.first_rows] = result.first_logp, result.first_entropy
    return model, (old, ent), result.stats


@pytest.mark.parametrize("micro", [None, 3])
def test_first_minibatch_behaviour_logprobs_from_the_update_pass(setup, micro):
    model, tok, prompts = setup
    rollout = _sample(model, tok, prompts, True, True, seed=1)
    ref_model, ref_batch, ref_stats = _update(model, rollout, False, micro=micro)
    fast_model, fast_batch, fast_stats = _update(model, rollout, True, micro=micro)
    # The filled rows are the no-grad values (up to float rounding of other batch compositions).
    (fast_old, fast_ent), (ref_old, ref_ent) = fast_batch, ref_batch
    torch.testing.assert_close(fast_old, ref_old, rtol=0, atol=1e-6)
    torch.testing.assert_close(fast_ent, ref_ent, rtol=0, atol=1e-5)
    assert (fast_old != 0).sum() == rollout.completion_mask.sum()  # every token filled
    for (name, p), q in zip(ref_model.named_parameters(), fast_model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)
    assert fast_stats.keys() == ref_stats.keys()
    for key in ref_stats:
        assert fast_stats[key] == pytest.approx(ref_stats[key], rel=1e-5, abs=1e-6), key
    assert fast_stats["update/optimizer_steps"] == 4.0


@pytest.mark.parametrize("entropy", [False, True])
def test_shared_prompt_forward_equals_the_full_forward(setup, entropy):
    """model_logprobs(share_prompts=True): each distinct prompt runs once and its keys/values are
    gathered to the group's rows; values and parameter gradients equal the full pass."""
    from mhpo.generation.rollout import position_ids
    from mhpo.models.logprobs import model_logprobs

    model, tok, prompts = setup
    rollout = _sample(model, tok, prompts, True, True, seed=2)
    ids, attn, P = rollout.input_ids, rollout.attention_mask, rollout.prompt_width
    mask = rollout.completion_mask
    w = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))
    out = {}
    for share in (False, True):
        m = copy.deepcopy(model)
        lp, ent = model_logprobs(m, ids, attn, P, entropy=entropy, share_prompts=share, position_ids=position_ids(attn))
        loss = (lp * w * mask).sum() + ((ent * mask).sum() if entropy else 0.0)
        loss.backward()
        out[share] = (lp.detach() * mask, ent.detach() * mask if entropy else None, [p.grad for p in m.parameters()])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-5)
    if entropy:
        torch.testing.assert_close(out[True][1], out[False][1], rtol=0, atol=1e-5)
    for g_shared, g_full in zip(out[True][2], out[False][2]):
        torch.testing.assert_close(g_shared, g_full, rtol=1e-4, atol=1e-6)


def test_shared_prompt_forward_applies_only_where_it_is_exact(setup):
    """No repeated prompt, a one-token prompt or extra model inputs: the full pass is used."""
    from mhpo.generation.rollout import position_ids
    from mhpo.models.logprobs import _shared_prompt_hidden

    model, tok, prompts = setup
    base = model.model
    rollout = _sample(model, tok, prompts, True, False)
    ids, attn, P = rollout.input_ids, rollout.attention_mask, rollout.prompt_width
    pos = {"position_ids": position_ids(attn)}
    assert _shared_prompt_hidden(base, ids, attn, P, pos) is not None  # groups of 4 identical prompts
    distinct = torch.arange(0, len(ids), G)  # one row per prompt
    assert (
        _shared_prompt_hidden(base, ids[distinct], attn[distinct], P, {"position_ids": pos["position_ids"][distinct]})
        is None
    )
    assert _shared_prompt_hidden(base, ids[:, P - 1 :], attn[:, P - 1 :], 1, {}) is None
    assert _shared_prompt_hidden(base, ids, attn, P, {**pos, "pixel_values": torch.zeros(1)}) is None


def test_prompts_run_once_for_several_passes_give_the_full_pass_gradients(setup):
    """PromptPrefix: the rows' prompts (left-padded, four lengths) run once; two passes over disjoint
    row sets read them, and after its backward the parameter gradients equal one full pass over all
    rows, as do the log-probs and entropies."""
    from mhpo.generation.rollout import position_ids
    from mhpo.models.logprobs import model_logprobs, prompt_prefix

    model, tok, prompts = setup
    rollout = _sample(model, tok, prompts, True, True, seed=4)
    w = torch.randn(rollout.completion_mask.shape, generator=torch.Generator().manual_seed(1))

    def logprobs(m, part, rows, **cache):  # ([b, c] log-probs, [b, c] entropies, the loss), zero off-mask
        a = part.attention_mask
        lp, ent = model_logprobs(
            m, part.input_ids, a, part.prompt_width, entropy=True, position_ids=position_ids(a), **cache
        )
        cm = part.completion_mask
        return lp * cm, ent * cm, (lp * cm * w[rows, : cm.shape[1]]).sum() + (ent * cm).sum()

    full, parts = copy.deepcopy(model), copy.deepcopy(model)
    lp_full, ent_full, loss = logprobs(full, rollout, torch.arange(len(rollout)))
    loss.backward()

    a = rollout.attention_mask
    prefix = prompt_prefix(parts, rollout.input_ids, a, rollout.prompt_width, position_ids=position_ids(a))
    assert prefix is not None
    for rows in (torch.arange(0, len(rollout), 2), torch.arange(1, len(rollout), 2)):  # each half: every prompt
        part = rollout.select(rows, trim_prompt=False)  # completions trimmed, prompt columns kept
        assert part.prompt_width == rollout.prompt_width
        lp, ent, loss = logprobs(parts, part, rows, prompt_cache=prefix.cache(rows))
        c = lp.shape[1]
        torch.testing.assert_close(lp, lp_full[rows, :c], rtol=0, atol=1e-5)
        torch.testing.assert_close(ent, ent_full[rows, :c], rtol=0, atol=1e-5)
        loss.backward()
    embed = parts.model.embed_tokens.weight
    before = embed.grad.clone()
    prefix.backward()
    assert not torch.equal(embed.grad, before)  # the prompt pass receives its gradient only now
    for (name, g_full), g_parts in zip(full.named_parameters(), parts.parameters()):
        torch.testing.assert_close(g_parts.grad, g_full.grad, rtol=1e-4, atol=1e-6, msg=name)
