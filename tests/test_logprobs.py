"""Chunked `token_logprobs` == the full-logits reference (values and gradients), and `model_logprobs`
== log_softmax of a real causal LM's logits gathered at the targets (including parameter gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mhpo.models.logprobs import (
    default_chunk_size,
    logits_postprocessed,
    model_logprobs,
    token_logprobs,
    token_logprobs_reference,
)
from mhpo.models.tiny import tiny_qwen2
from mhpo.models.tokenizer import build_char_tokenizer


def _inputs(lead=(2, 5), vocab=37, width=8, dtype=torch.float64, bias=True, seed=0):
    """hidden [*lead, H], weight [V, H], bias [V] | None (all requiring grad), targets [*lead]."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, width, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(vocab, width, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(vocab, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, lead, generator=gen)
    return hidden, weight, b, targets


def _run(fn, hidden, weight, bias, targets, *, entropy, use_logp=True, seed=1, **kw):
    """Outputs and grads of sum(g1 * logp) + sum(g2 * H) w.r.t. (hidden, weight, bias), random g1, g2."""
    logp, ent = fn(hidden, weight, targets, bias=bias, entropy=entropy, **kw)
    gen = torch.Generator().manual_seed(seed)
    g1 = torch.randn(logp.shape, generator=gen, dtype=logp.dtype)
    g2 = torch.randn(logp.shape, generator=gen, dtype=logp.dtype)
    loss = (g1 * logp).sum() if use_logp else 0.0
    if entropy:
        loss = loss + (g2 * ent).sum()
    leaves = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, leaves)
    return logp, ent, grads


def _assert_same(fast, ref, atol, rtol=0.0):
    (lp, ent, grads), (lp_r, ent_r, grads_r) = fast, ref
    torch.testing.assert_close(lp, lp_r, atol=atol, rtol=rtol)
    if ent_r is None:
        assert ent is None
    else:
        torch.testing.assert_close(ent, ent_r, atol=atol, rtol=rtol)
    assert len(grads) == len(grads_r)
    for g, g_r in zip(grads, grads_r):
        assert g.dtype == g_r.dtype
        torch.testing.assert_close(g, g_r, atol=atol, rtol=rtol)


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 10, 64])  # 10 tokens: 3, 4, 7 leave a ragged last chunk
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_equals_reference_float64(chunk, entropy, temperature, bias):
    args = _inputs(bias=bias)
    fast = _run(token_logprobs, *args, entropy=entropy, temperature=temperature, chunk_size=chunk)
    ref = _run(token_logprobs_reference, *args, entropy=entropy, temperature=temperature)
    assert fast[0].dtype == torch.float64
    _assert_same(fast, ref, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    vocab=st.integers(1, 50),
    chunk=st.integers(1, 9),
    temperature=st.floats(0.3, 3.0),
    entropy=st.booleans(),
    bias=st.booleans(),
)
def test_chunked_equals_reference_any_shape(lead, vocab, chunk, temperature, entropy, bias):
    args = _inputs(lead=tuple(lead), vocab=vocab, width=5, bias=bias)
    fast = _run(token_logprobs, *args, entropy=entropy, temperature=temperature, chunk_size=chunk)
    ref = _run(token_logprobs_reference, *args, entropy=entropy, temperature=temperature)
    assert fast[0].shape == tuple(lead)
    _assert_same(fast, ref, atol=1e-11)


def test_gradcheck_float64():
    hidden, weight, bias, targets = _inputs(lead=(7,), vocab=11, width=6)

    def fn(h, w, b):
        return token_logprobs(h, w, targets, bias=b, temperature=0.8, entropy=True, chunk_size=3)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


@pytest.mark.parametrize("chunk", [5, 16, 1000])
def test_float32_matches_reference(chunk):
    args = _inputs(lead=(3, 17), vocab=500, width=32, dtype=torch.float32)
    fast = _run(token_logprobs, *args, entropy=True, temperature=1.3, chunk_size=chunk)
    ref = _run(token_logprobs_reference, *args, entropy=True, temperature=1.3)
    assert fast[0].dtype == torch.float32 and fast[1].dtype == torch.float32
    _assert_same(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(dtype):
    """Half inputs: float32 outputs, grads in the input dtype, equal to float32 math on the same values."""
    hidden, weight, bias, targets = _inputs(lead=(4, 6), vocab=300, width=16, dtype=dtype)
    fast = _run(token_logprobs, hidden, weight, bias, targets, entropy=True, temperature=0.9, chunk_size=7)
    assert fast[0].dtype == torch.float32 and fast[1].dtype == torch.float32
    assert [g.dtype for g in fast[2]] == [dtype] * 3
    up = [t.detach().float().requires_grad_() for t in (hidden, weight, bias)]
    ref = _run(token_logprobs_reference, *up, targets, entropy=True, temperature=0.9)
    torch.testing.assert_close(fast[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], ref[1], atol=1e-5, rtol=1e-5)
    for g, g_r in zip(fast[2], ref[2]):  # float32 grads rounded once to the half dtype
        torch.testing.assert_close(g, g_r.to(dtype), atol=1e-2, rtol=1e-2)
    ref_half = _run(token_logprobs_reference, hidden, weight, bias, targets, entropy=True, temperature=0.9)
    _assert_same(fast, ref_half, atol=1e-2, rtol=1e-2)


def test_autocast_does_not_lower_the_logits_precision():
    """Forward under bf16 autocast (backward outside, as recommended): logits stay float32."""
    hidden, weight, bias, targets = _inputs(lead=(4, 6), vocab=300, width=16, dtype=torch.float32)
    for fn in (token_logprobs, token_logprobs_reference):
        logp, ent = fn(hidden, weight, targets, bias=bias, entropy=True, temperature=0.9)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp_ac, ent_ac = fn(hidden, weight, targets, bias=bias, entropy=True, temperature=0.9)
        torch.testing.assert_close(logp_ac, logp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent_ac, ent, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad(logp.sum() + ent.sum(), (hidden, weight, bias))
        grads_ac = torch.autograd.grad(logp_ac.sum() + ent_ac.sum(), (hidden, weight, bias))
        for g, g_ac in zip(grads, grads_ac):
            torch.testing.assert_close(g_ac, g, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_logp", [False, True])
def test_entropy_gradient_alone_and_logp_gradient_alone(use_logp):
    """Only one output in the loss: the other output's gradient is None in backward."""
    args = _inputs()
    fast = _run(token_logprobs, *args, entropy=True, use_logp=use_logp, chunk_size=3)
    ref = _run(token_logprobs_reference, *args, entropy=True, use_logp=use_logp)
    _assert_same(fast, ref, atol=1e-12)
    logp, ent = token_logprobs(*args[:2], args[3], bias=args[2], entropy=True)
    fast_grads = torch.autograd.grad(logp.sum(), args[:3])
    ref_logp, _ = token_logprobs_reference(*args[:2], args[3], bias=args[2], entropy=True)
    for g, g_r in zip(fast_grads, torch.autograd.grad(ref_logp.sum(), args[:3])):
        torch.testing.assert_close(g, g_r, atol=1e-12, rtol=0)


def test_only_some_inputs_require_grad():
    hidden, weight, bias, targets = _inputs()
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    fast = _run(token_logprobs, hidden, weight, bias, targets, entropy=True, chunk_size=4)
    ref = _run(token_logprobs_reference, hidden, weight, bias, targets, entropy=True)
    assert len(fast[2]) == 1
    _assert_same(fast, ref, atol=1e-12)


def test_tied_weight_gradient_accumulates_over_both_uses():
    """weight is also the input embedding: its gradient is the sum over the embedding and the head."""
    hidden, weight, bias, targets = _inputs(lead=(3, 4), bias=False)
    ids = targets.roll(1, dims=-1)

    def tied(fn):
        def call(h, w, y, **kw):
            return fn(torch.tanh(F.embedding(ids, w) + h), w, y, **kw)

        return call

    fast = _run(tied(token_logprobs), hidden, weight, None, targets, entropy=True, chunk_size=5)
    ref = _run(tied(token_logprobs_reference), hidden, weight, None, targets, entropy=True)
    _assert_same(fast, ref, atol=1e-12)


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_empty_inputs(lead):
    hidden, weight, bias, targets = _inputs(lead=lead)
    logp, ent = token_logprobs(hidden, weight, targets, bias=bias, entropy=True)
    assert logp.shape == lead and ent.shape == lead
    grads = torch.autograd.grad((logp.sum() + ent.sum()), (hidden, weight, bias))
    assert grads[0].shape == hidden.shape
    assert torch.count_nonzero(grads[1]) == 0 and torch.count_nonzero(grads[2]) == 0


def test_no_logits_are_saved_for_backward():
    """The graph holds hidden, weight, bias, targets and [N] vectors: nothing of size N x V."""
    hidden, weight, bias, targets = _inputs(lead=(6, 10), vocab=1000, width=4)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, ent = token_logprobs(hidden, weight, targets, bias=bias, entropy=True, chunk_size=8)
    n, vocab = targets.numel(), weight.shape[0]
    assert sum(saved) <= hidden.numel() + weight.numel() + vocab + 3 * n
    assert max(saved) < n * vocab
    (logp.sum() + ent.sum()).backward()  # the saved tensors are enough for backward


def test_default_chunk_size_shrinks_with_the_vocabulary():
    assert default_chunk_size(50_000) == 2048
    assert default_chunk_size(150_000) == 682
    assert default_chunk_size(10**12) == 1
    args = _inputs(lead=(2, 5), vocab=37)
    _assert_same(_run(token_logprobs, *args, entropy=True), _run(token_logprobs_reference, *args, entropy=True), 1e-12)


def test_bad_inputs_raise_with_the_bad_value():
    hidden, weight, bias, targets = _inputs()
    cases = [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=2.5), "chunk_size"),
        (dict(bias=bias[:-1]), r"bias must be \[37\]"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            token_logprobs(hidden, weight, targets, **kwargs)
    with pytest.raises(ValueError, match=r"max 37"):
        token_logprobs(hidden, weight, torch.full_like(targets, 37))
    with pytest.raises(ValueError, match=r"min -1"):
        token_logprobs(hidden, weight, torch.full_like(targets, -1))
    with pytest.raises(ValueError, match="leading shape"):
        token_logprobs(hidden, weight, targets[:, :3])
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        token_logprobs(hidden[..., :3], weight, targets)
    with pytest.raises(ValueError, match="integer token ids"):
        token_logprobs(hidden, weight, targets.double())


# --- model_logprobs on real (tiny) causal LMs --------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def _batch(tokenizer, prompt_width=5, completion=7):
    """Left-padded prompts of width P followed by completions: ids [3, P + C], mask [3, P + C]."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(4, len(tokenizer), (3, prompt_width + completion), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = tokenizer.pad_token_id, 0  # a shorter, left-padded prompt
    return ids, mask


def _full_logits_reference(model, ids, mask, prompt_width, temperature):
    """log_softmax of the full model's logits, gathered at the completion tokens; and entropy."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, L, V]
    z = logits[:, prompt_width - 1 : -1].double() / temperature  # [B, C, V]
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, ids[:, prompt_width:].unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def _compare_with_full_logits(model, ids, mask, prompt_width=5, temperature=0.8, atol=2e-5):
    params = [p for p in model.parameters() if p.requires_grad]
    logp, ent = model_logprobs(model, ids, mask, prompt_width, temperature=temperature, entropy=True, chunk_size=4)
    assert logp.dtype == torch.float32 and logp.shape == (ids.shape[0], ids.shape[1] - prompt_width)
    gen = torch.Generator().manual_seed(4)
    g1, g2 = torch.randn(logp.shape, generator=gen), torch.randn(logp.shape, generator=gen)
    grads = torch.autograd.grad((g1 * logp).sum() + (g2 * ent).sum(), params, allow_unused=True)
    ref_logp, ref_ent = _full_logits_reference(model, ids, mask, prompt_width, temperature)
    ref_grads = torch.autograd.grad(
        (g1.double() * ref_logp).sum() + (g2.double() * ref_ent).sum(), params, allow_unused=True
    )
    torch.testing.assert_close(logp.double(), ref_logp, atol=atol, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, atol=atol, rtol=1e-5)
    assert any(g is not None for g in grads)
    for g, g_r in zip(grads, ref_grads):
        assert (g is None) == (g_r is None)
        if g is not None:
            torch.testing.assert_close(g, g_r, atol=atol, rtol=1e-4)


def test_model_logprobs_tied_qwen2(tokenizer):
    model = tiny_qwen2(tokenizer)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert not logits_postprocessed(model)
    _compare_with_full_logits(model, *_batch(tokenizer))


def test_model_logprobs_untied_head_with_bias(tokenizer):
    model = tiny_qwen2(tokenizer)
    torch.manual_seed(5)
    model.lm_head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    _compare_with_full_logits(model, *_batch(tokenizer))


def test_model_logprobs_empty_completion(tokenizer):
    model = tiny_qwen2(tokenizer)
    ids, mask = _batch(tokenizer, completion=0)
    logp, ent = model_logprobs(model, ids, mask, ids.shape[1], entropy=True)
    assert logp.shape == (3, 0) and ent.shape == (3, 0)
    with pytest.raises(ValueError, match="prompt_width"):
        model_logprobs(model, ids, mask, 0)


def _tiny_gemma2(vocab, softcap):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=64,
        final_logit_softcapping=softcap,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(6)
    return Gemma2ForCausalLM(config)


def _tiny_cohere(vocab, logit_scale):
    from transformers import CohereConfig, CohereForCausalLM

    config = CohereConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        logit_scale=logit_scale,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(7)
    return CohereForCausalLM(config)


@pytest.mark.parametrize("build", [lambda v: _tiny_gemma2(v, softcap=0.5), lambda v: _tiny_cohere(v, logit_scale=3.0)])
def test_model_logprobs_falls_back_when_logits_are_postprocessed(tokenizer, build):
    """Softcapped / scaled logits: hidden-state scoring would be wrong, so the full logits are used."""
    model = build(len(tokenizer))
    ids, mask = _batch(tokenizer)
    assert logits_postprocessed(model)
    _compare_with_full_logits(model, ids, mask)
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 4:-1]
    naive, _ = token_logprobs(hidden, model.lm_head.weight, ids[:, 5:], temperature=0.8)
    full, _ = _full_logits_reference(model, ids, mask, 5, 0.8)
    assert (naive.double() - full).abs().max() > 1e-3  # the fallback is needed on this model


def test_logits_postprocessed_reads_text_config_and_identity_scales():
    from types import SimpleNamespace

    from transformers import Gemma3Config

    assert not logits_postprocessed(_tiny_cohere(40, logit_scale=1.0))  # a scale of 1 changes nothing
    assert logits_postprocessed(_tiny_gemma2(40, softcap=30.0))
    assert not logits_postprocessed(_tiny_gemma2(40, softcap=None))
    vlm = Gemma3Config(text_config=dict(final_logit_softcapping=30.0))  # the cap lives in the text config
    assert logits_postprocessed(SimpleNamespace(config=vlm))
    assert not logits_postprocessed(SimpleNamespace(config=Gemma3Config()))
    assert logits_postprocessed(SimpleNamespace(config=Gemma3Config(), final_logits_bias=torch.zeros(1, 40)))
