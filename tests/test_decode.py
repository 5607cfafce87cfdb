"""The decode loop: greedy tokens of ``model.generate``, its sampling distribution, log-probs (and entropy)
equal to the trainer's recompute, and the shortcuts (shared prompt prefill, dropping finished rows) really taken."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mhpo.generation import decode, sampling_config, truncate
from mhpo.generation.prompts import PromptEncoder
from mhpo.generation.rollout import repeat_rows, sample
from mhpo.models.tiny import build_tiny, seeded_init, tiny_text_config
from mhpo.models.tokens import neutral_generation_config
from mhpo.tasks import Example
from mhpo.trainer.config import TinyModelConfig
from mhpo.trainer.update import rollout_logprobs

decode_module = importlib.import_module("mhpo.generation.decode")  # the package exports the function
pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_NEW = 10


def _sharp(arch, tok):
    """A tiny Qwen2 / Llama with 10x the usual initial weight scale: its greedy completions vary (at the
    usual scale an untrained model repeats one token)."""
    sizes = tiny_text_config(tok, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64, max_positions=128)
    model_class, config_class = {"qwen2": (Qwen2ForCausalLM, Qwen2Config), "llama": (LlamaForCausalLM, LlamaConfig)}[
        arch
    ]
    model = seeded_init(model_class, config_class(initializer_range=0.2, **sizes), seed=5)
    neutral_generation_config(model)
    return model.eval()


@pytest.fixture(scope="module")
def setup():
    tiny, tok = build_tiny(TinyModelConfig(hidden_size=32, num_layers=2, intermediate_size=64), seed=3)
    models = {"tiny": tiny.eval(), "qwen2": _sharp("qwen2", tok), "llama": _sharp("llama", tok)}
    prompts = PromptEncoder(tok, chat=False)([Example(p, "") for p in ("12+7=", "3+4=", "100+200=", "9=")])
    assert (prompts["attention_mask"] == 0).any()  # left padding
    # Stop tokens the untrained models do produce, so that rows end at different steps: for the sharp
    # models three ids of their greedy run, for the near-uniform tiny one a tenth of the vocabulary.
    stops = {"tiny": list(range(10, 20))}
    for arch in ("qwen2", "llama"):
        greedy = decode(models[arch], **prompts, max_new_tokens=MAX_NEW, eos_ids=[2], pad_id=0, do_sample=False)
        stops[arch] = sorted({int(greedy.tokens[0, 3]), int(greedy.tokens[1, 6]), int(greedy.tokens[2, 1])})
    return models, tok, prompts, stops


def _generate(model, tok, prompts, group_size, eos, seed=0, **settings):
    """The reference: ``model.generate`` on every row's own copy of its prompt."""
    rows = repeat_rows(prompts, group_size)
    cfg = sampling_config(model, max_new_tokens=MAX_NEW, eos_ids=eos, pad_id=tok.pad_token_id, **settings)
    torch.manual_seed(seed)
    return model.generate(**rows, generation_config=cfg)[:, rows["input_ids"].shape[1] :]


def _decode(model, tok, prompts, group_size, eos, seed=0, compact_fraction=None, **settings):
    torch.manual_seed(seed)
    return decode(
        model,
        **prompts,
        group_size=group_size,
        max_new_tokens=MAX_NEW,
        eos_ids=eos,
        pad_id=tok.pad_token_id,
        compact_fraction=compact_fraction,
        **settings,
    )


class ForwardLog:
    """The input_ids shape of every forward pass of ``model``'s base model."""

    def __init__(self, model):
        self.shapes: list[tuple[int, int]] = []
        base = getattr(model, model.base_model_prefix)
        self.handle = base.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.shapes.append(tuple(kwargs["input_ids"].shape))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("arch", ["tiny", "qwen2", "llama"])
@pytest.mark.parametrize("group_size", [1, 3])
def test_greedy_tokens_equal_generate(setup, arch, group_size):
    models, tok, prompts, stops = setup
    model, eos = models[arch], stops[arch]
    ref = _generate(model, tok, prompts, group_size, eos, do_sample=False, temperature=1.0, top_p=1.0, top_k=0)
    with ForwardLog(model) as log:
        out = _decode(model, tok, prompts, group_size, eos, do_sample=False, compact_fraction=0.25)
    assert torch.equal(out.tokens, ref)
    if arch != "tiny":  # (the tiny model's greedy rows repeat one token that is no stop token)
        assert (out.tokens == tok.pad_token_id).any()  # rows did end early ...
        assert min(b for b, _ in log.shapes) < len(ref)  # ... and left the batch


def _chi2_same(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Two-sample chi-square of equal-size count vectors: (sum (a - b)^2 / (a + b), degrees of freedom)."""
    seen = (a + b) > 0
    a, b = a[seen].double(), b[seen].double()
    return float(((a - b) ** 2 / (a + b)).sum()), int(seen.sum()) - 1


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, 0, 1.0), (1.3, 0, 1.0), (0.7, 5, 1.0), (0.8, 0, 0.9), (1.0, 10, 0.8)]
)
def test_sampled_tokens_follow_generates_distribution(setup, temperature, top_k, top_p):
    """The loop draws by inverse CDF (one uniform per row), generate by multinomial: different random
    streams, one distribution. 6,000 completions of one prompt from each: the token counts at each of
    the first three positions agree by a two-sample chi-square test (statistic below df + 6 sd)."""
    models, tok, prompts, stops = setup
    settings = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    one = {k: v[2:3] for k, v in prompts.items()}
    n, vocab = 6000, len(tok)
    for arch in ("tiny", "llama"):
        cfg = sampling_config(models[arch], max_new_tokens=3, eos_ids=stops[arch], pad_id=tok.pad_token_id, **settings)
        rows = repeat_rows(one, n)
        torch.manual_seed(1)
        ref = models[arch].generate(**rows, generation_config=cfg)[:, rows["input_ids"].shape[1] :]
        torch.manual_seed(2)
        out = decode(
            models[arch],
            **one,
            group_size=n,
            max_new_tokens=3,
            eos_ids=stops[arch],
            pad_id=tok.pad_token_id,
            **settings,
        ).tokens
        assert out.shape == ref.shape == (n, 3)
        for t in range(3):
            ours, theirs = torch.bincount(out[:, t], minlength=vocab), torch.bincount(ref[:, t], minlength=vocab)
            stat, df = _chi2_same(ours, theirs)
            assert df >= 1 and stat < df + 6 * (2 * df) ** 0.5, (arch, t, stat, df)


def test_draw_follows_the_softmax_and_never_picks_an_excluded_token():
    """200,000 inverse-CDF draws from 40 logits (8 excluded, a few with p ~ 1e-3): counts match
    softmax by a chi-square test against the exact probabilities; -inf entries never come out."""
    from mhpo.generation.sampling import draw

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(40, generator=gen) * 2
    z[[0, 5, 6, 17, 30, 37, 38, 39]] = float("-inf")
    z[[1, 2]] = z.max() - 7.0  # rare, ~1e-3
    probs = torch.softmax(z.double(), -1)
    torch.manual_seed(3)
    picks = torch.cat([draw(z.expand(50_000, -1)) for _ in range(4)])
    counts = torch.bincount(picks, minlength=40).double()
    assert counts[torch.isinf(z)].sum() == 0
    expected = probs * len(picks)
    kept = expected > 0
    stat = float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())
    df = int(kept.sum()) - 1
    assert stat < df + 6 * (2 * df) ** 0.5, stat


@pytest.mark.parametrize("arch", ["tiny", "qwen2", "llama"])
@pytest.mark.parametrize(
    "do_sample, temperature, top_k, top_p", [(True, 1.3, 8, 0.9), (True, 0.6, 0, 1.0), (False, 1.0, 0, 1.0)]
)
def test_sampler_logprobs_equal_the_trainers_recompute(setup, arch, do_sample, temperature, top_k, top_p):
    """Rollout.logprobs = log softmax(logits / T)[token] over the full vocabulary (top-k / top-p only
    choose the token), as ``rollout_logprobs`` recomputes them: within 1e-5 in float32."""
    models, tok, prompts, stops = setup
    model = models[arch]
    torch.manual_seed(0)
    r = sample(
        model,
        tok,
        prompts,
        group_size=4,
        max_new_tokens=MAX_NEW,
        eos_ids=stops[arch],
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        batch_size=12,
    )
    assert r.logprobs.dtype == torch.float32 and r.logprobs.shape == r.completion_mask.shape
    if do_sample or arch != "tiny":  # (the tiny model's greedy rows repeat one token that is no stop token)
        assert r.lengths.min() < r.completion_mask.shape[1]  # some rows ended early
    recomputed, _ = rollout_logprobs(model, r, temperature=temperature)
    m = r.completion_mask
    assert (r.logprobs[~m] == 0).all() and (r.logprobs[m] < 0).all()
    assert (recomputed - r.logprobs).abs().max() <= 1e-5


def test_shared_prompt_prefill_runs(setup):
    """G > 1: the prompts' first P-1 positions run once per prompt ([U, P-1]), then only the last
    prompt token per row ([U*G, 1]); no forward ever holds a whole prompt per row."""
    models, tok, prompts, _ = setup
    U, P = prompts["input_ids"].shape
    G = 4
    with ForwardLog(models["tiny"]) as log:
        _decode(models["tiny"], tok, prompts, G, [tok.eos_token_id], do_sample=True)
    assert log.shapes[:2] == [(U, P - 1), (U * G, 1)]
    assert all(length == 1 for _, length in log.shapes[1:])
    with ForwardLog(models["tiny"]) as log:  # G = 1: nothing to share, one plain prefill
        _decode(models["tiny"], tok, prompts, 1, [tok.eos_token_id], do_sample=True)
    assert log.shapes[0] == (U, P) and all(length == 1 for _, length in log.shapes[1:])


def test_compaction_keeps_the_greedy_completions(setup):
    models, tok, prompts, stops = setup
    full = _decode(models["llama"], tok, prompts, 3, stops["llama"], do_sample=False)
    with ForwardLog(models["llama"]) as log:
        compact = _decode(models["llama"], tok, prompts, 3, stops["llama"], do_sample=False, compact_fraction=0.01)
    torch.testing.assert_close(compact.logprobs, full.logprobs, atol=1e-5, rtol=0)  # other batch, other rounding
    assert torch.equal(compact.tokens, full.tokens)
    sizes = [b for b, _ in log.shapes[1:]]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]


@pytest.mark.parametrize("compact_fraction", [None, 0.01])
def test_the_cache_writes_each_step_in_place_with_the_same_completions(setup, monkeypatch, compact_fraction):
    """After the prefill every layer's keys and values live in one reserved buffer for the whole call
    (a new one only when finished rows leave the batch), and the sampled tokens and log-probs equal,
    bit for bit, those of transformers' cache that concatenates at every step."""
    models, tok, prompts, stops = setup
    buffers: dict[int, set[int]] = {}
    update = decode_module.ReservedLayer.update

    def recorded(layer, *args, **kwargs):
        out = update(layer, *args, **kwargs)
        buffers.setdefault(id(layer), set()).add(layer._key_room.data_ptr())
        assert out[0].data_ptr() == layer._key_room.data_ptr()  # attention reads a view of the buffer
        return out

    run = dict(compact_fraction=compact_fraction, do_sample=True, temperature=1.3)
    with monkeypatch.context() as m:
        m.setattr(decode_module.ReservedLayer, "update", recorded)
        reserved = _decode(models["qwen2"], tok, prompts, 3, stops["qwen2"], **run)
    with monkeypatch.context() as m:
        m.setattr(decode_module, "reserve_room", lambda cache, room: None)
        growing = _decode(models["qwen2"], tok, prompts, 3, stops["qwen2"], **run)
    assert torch.equal(reserved.tokens, growing.tokens) and torch.equal(reserved.logprobs, growing.logprobs)
    assert (reserved.tokens == tok.pad_token_id).any()  # some rows ended early
    steps = reserved.tokens.shape[1] - 1
    assert len(buffers) == models["qwen2"].config.num_hidden_layers and steps > 1
    if compact_fraction is None:
        assert all(len(ptrs) == 1 for ptrs in buffers.values())


def test_a_reserved_layer_grows_past_its_room_and_drops_rows():
    from transformers.cache_utils import DynamicLayer

    layer = DynamicLayer()
    k, v = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    layer.update(k, v)
    reserved = decode_module.ReservedLayer.reserve(layer, room=1)
    new = [(torch.randn(3, 2, 1, 5), torch.randn(3, 2, 1, 5)) for _ in range(3)]  # 3 steps > room
    for nk, nv in new:
        keys, values = reserved.update(nk, nv)
    assert torch.equal(keys, torch.cat([k, *(nk for nk, _ in new)], dim=2))
    assert torch.equal(values, torch.cat([v, *(nv for _, nv in new)], dim=2))
    assert reserved._key_room.shape[2] == 5 + decode_module.ROOM  # grown once, by ROOM positions
    reserved.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(reserved.keys, keys[[2, 0]]) and reserved.get_seq_length() == 7


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.7), (0, 0.999), (7, 0.5), (60, 0.95)])
def test_truncation_keeps_what_the_transformers_warpers_keep(top_k, top_p):
    z = torch.randn(16, 50, generator=torch.Generator().manual_seed(0)) * 3
    ref = z
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    out = truncate(z, top_k, top_p)
    assert torch.equal(out.isfinite(), ref.isfinite())
    assert torch.equal(out[out.isfinite()], z[out.isfinite()])
    if not top_k and top_p == 1.0:
        assert out is z  # nothing to do: no copy, no sort


@pytest.mark.parametrize("scale, sorts", [(8.0, False), (0.5, True)])
def test_nucleus_from_the_largest_logits_without_a_sort(monkeypatch, scale, sorts):
    """A 5,000-token vocabulary: for peaked logits the nucleus comes from torch.topk's 256 largest (no
    sort of the vocabulary), for flat ones from a full sort; both keep what TopPLogitsWarper keeps."""
    from mhpo.generation import sampling

    z = torch.randn(8, 5000, generator=torch.Generator().manual_seed(1)) * scale
    ref = TopPLogitsWarper(0.9)(None, z)
    calls = []
    real_sort = torch.sort
    monkeypatch.setattr(sampling.torch, "sort", lambda *a, **k: calls.append(1) or real_sort(*a, **k))
    out = truncate(z, 0, 0.9)
    assert bool(calls) == sorts
    assert torch.equal(out.isfinite(), ref.isfinite()) and 1 < int(out[0].isfinite().sum()) < 5000


def test_select_carries_the_logprobs(setup):
    models, tok, prompts, stops = setup
    torch.manual_seed(0)
    r = sample(models["tiny"], tok, prompts, group_size=2, max_new_tokens=MAX_NEW, eos_ids=stops["tiny"])
    short = int(r.lengths.argmin())
    sub = r.select([short])  # trimmed to the row's own length
    assert sub.logprobs.shape == sub.completion_mask.shape == (1, int(r.lengths[short]))
    assert torch.equal(sub.logprobs[0], r.logprobs[short, : sub.logprobs.shape[1]])
    assert torch.equal(r.select([1, 0], trim=False).logprobs, r.logprobs[[1, 0]])


def test_image_prompts_sample_with_generate_and_record_the_same_logprobs():
    """Prompts with pixels go through the model's own generate; a logits processor records
    log softmax(logits / T)[token] on the way, equal to the recompute."""
    from mhpo.generation.prompts import build_encoder, eos_token_ids
    from mhpo.models.multimodal import text_tokenizer
    from mhpo.models.vlm import build_tiny_vlm
    from mhpo.tasks import build_task
    from mhpo.trainer.config import load_config

    cfg = load_config("vlm")
    model, processor = build_tiny_vlm(cfg.model.tiny, cfg.model.vision, seed=0)
    encoder = build_encoder(processor, chat_template="auto")
    tok = text_tokenizer(processor)
    torch.manual_seed(0)
    prompts = encoder(build_task(cfg.task).heldout(3, 0))
    r = sample(
        model,
        tok,
        prompts,
        group_size=2,
        max_new_tokens=4,
        eos_ids=eos_token_ids(model, tok),
        temperature=0.8,
        top_k=20,
    )
    recomputed, _ = rollout_logprobs(model, r, temperature=0.8)
    assert (r.logprobs[~r.completion_mask] == 0).all()
    assert (recomputed - r.logprobs).abs().max() <= 1e-5
