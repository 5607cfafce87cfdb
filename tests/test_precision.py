"""model.dtype: which precision 'auto' picks, and bf16-mixed (float32 master weights, bf16 autocast)
against float32 on the tiny model: log-probs within bf16 tolerance, a run that trains finitely."""

from __future__ import annotations

import contextlib
import importlib
import json
import math

import pytest
import torch

from mhpo.models import device
from mhpo.models.device import Precision, cpu_has_bf16, resolve_precision

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


def test_cpu_flags_decide_native_bf16():
    assert cpu_has_bf16("processor\t: 0\nflags\t\t: fpu avx avx2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_bf16("flags\t: fpu avx2 amx_bf16\n")
    assert not cpu_has_bf16("flags\t: fpu avx avx2 avx512f avx512bw\n")  # AVX512 without BF16: emulated


@pytest.mark.parametrize(
    ("native", "built_in", "expected"),
    [
        (True, False, Precision(torch.float32, torch.bfloat16)),
        (True, True, Precision(torch.float32)),  # the tiny demo stays float32
        (False, False, Precision(torch.float32)),
    ],
)
def test_auto_on_cpu(monkeypatch, native, built_in, expected):
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: native)
    assert resolve_precision("auto", CPU, built_in=built_in) == expected


def test_explicit_precisions_and_bad_name():
    assert resolve_precision("bf16-mixed", CPU).name == "bf16-mixed"
    assert resolve_precision("float32", CPU) == Precision(torch.float32)
    assert resolve_precision("bfloat16", CPU) == Precision(torch.bfloat16)
    with pytest.raises(
        ValueError, match="unknown model.dtype 'bf17'; valid: auto, float32, bfloat16, float16, bf16-mixed"
    ):
        resolve_precision("bf17", CPU)


def _tiny_rollout():
    from mhpo.generation.prompts import PromptEncoder, eos_token_ids
    from mhpo.generation.rollout import sample
    from mhpo.models.tiny import build_tiny
    from mhpo.tasks.procedural import build_procedural
    from mhpo.trainer.config import load_config

    cfg = load_config(None, [])
    model, tok = build_tiny(cfg.model.tiny, seed=3)
    examples = build_procedural("addition", {}).heldout(6, 1)
    torch.manual_seed(0)
    rollout = sample(
        model,
        tok,
        PromptEncoder(tok, chat=False)(examples),
        group_size=2,
        max_new_tokens=5,
        eos_ids=eos_token_ids(model, tok),
    )
    return model, rollout


def test_bf16_mixed_logprobs_agree_with_float32():
    from mhpo.trainer.update import rollout_logprobs

    model, rollout = _tiny_rollout()
    ref, _ = rollout_logprobs(model, rollout, temperature=1.0)
    with Precision(torch.float32, torch.bfloat16).context(CPU):
        mixed, _ = rollout_logprobs(model, rollout, temperature=1.0)
    m = rollout.completion_mask
    assert mixed.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32
    diff = (mixed - ref)[m].abs()
    # bf16 keeps 8 bits of mantissa: per-matmul relative error ~2^-8; a 2-layer model's logits move
    # by a few hundredths of a nat, never by more than a tenth
    assert 0 < float(diff.max()) < 0.1 and float(diff.mean()) < 0.03, (float(diff.max()), float(diff.mean()))


def test_bf16_mixed_forward_sees_weights_changed_inside_the_context():
    """autocast's weight cache would keep the first bf16 copy of each weight until the context exits:
    an RL step (one context) would then train every minibatch after the first with stale weights."""
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(3, 8)
    with Precision(torch.float32, torch.bfloat16).context(CPU):
        before = layer(x)
        with torch.no_grad():
            layer.weight.mul_(2.0)
        after = layer(x)
    with Precision(torch.float32, torch.bfloat16).context(CPU):
        fresh = layer(x)
    assert not torch.equal(before, after) and torch.equal(after, fresh)


def test_decode_casts_the_weights_once_under_bf16_and_drops_the_copies():
    """The decode loop caches each weight's bf16 copy for its own duration only: fewer casts than a
    per-forward cast, and a forward after it (weights changed) uses the new weights."""
    from torch.profiler import profile

    decode_module = importlib.import_module("mhpo.generation.decode")

    model, rollout = _tiny_rollout()
    P = rollout.prompt_width
    prompts = {"input_ids": rollout.input_ids[:, :P], "attention_mask": rollout.attention_mask[:, :P]}

    def casts(cast_once) -> int:
        decode_module.cast_weights_once = cast_once
        try:
            with Precision(torch.float32, torch.bfloat16).context(CPU), profile() as prof:
                decode_module.decode(model, **prompts, max_new_tokens=6, eos_ids=[], pad_id=0, compact_fraction=None)
        finally:
            decode_module.cast_weights_once = device.cast_weights_once
        return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")

    weights = sum(1 for p in model.parameters() if p.dim() == 2)
    assert casts(device.cast_weights_once) + 4 * weights <= casts(lambda _device: contextlib.nullcontext())
    ids = rollout.input_ids
    with Precision(torch.float32, torch.bfloat16).context(CPU), torch.no_grad():
        decode_module.decode(model, **prompts, max_new_tokens=3, eos_ids=[], pad_id=0)
        model.lm_head.weight.mul_(3.0)
        after = model(ids).logits
    with Precision(torch.float32, torch.bfloat16).context(CPU), torch.no_grad():
        assert torch.equal(after, model(ids).logits)


def test_cpu_attention_equals_transformers_sdpa_and_runs_bf16_in_float32():
    """A text policy loaded on a CPU gets :mod:`mhpo.models.attention`'s SDPA (grouped-query heads
    shared in the kernel, float32 math under bf16 autocast) at either precision. With left padding
    (the mask must reach it) its float32 logits and gradients equal transformers' ``sdpa`` (which
    repeats the key / value heads), and bf16-mixed agrees with float32 to bf16 tolerance."""
    from mhpo.generation.policy import load_weights
    from mhpo.models.tiny import build_tiny
    from mhpo.trainer.config import TinyModelConfig

    build = {"tiny": lambda: build_tiny(TinyModelConfig(hidden_size=32, num_layers=2, intermediate_size=64), seed=3)}
    mixed, _ = load_weights("tiny", precision=Precision(torch.float32, torch.bfloat16), device=CPU, builders=build)
    ours, _ = load_weights("tiny", precision=Precision(torch.float32), device=CPU, builders=build)
    theirs, _ = build["tiny"]()
    assert mixed.config._attn_implementation == ours.config._attn_implementation == "mhpo_cpu_sdpa"
    assert theirs.config._attn_implementation == "sdpa" and theirs.config.num_key_value_heads < 4
    ids = torch.randint(3, 20, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    out, ref = (
        ours(ids, attention_mask=mask, position_ids=pos).logits,
        theirs(ids, attention_mask=mask, position_ids=pos).logits,
    )
    assert float((out - ref).detach()[real].abs().max()) < 1e-5
    out[real].square().sum().backward()
    ref[real].square().sum().backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
    with torch.no_grad(), Precision(torch.float32, torch.bfloat16).context(CPU):
        low = mixed(ids, attention_mask=mask, position_ids=pos).logits
    assert 0 < float((low.float() - ref.detach())[real].abs().max()) < 0.1
    with Precision(torch.float32, torch.bfloat16).context(CPU):  # RoPE leaves q, k float32 and v bf16 here
        hidden = mixed.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state
    hidden.float().sum().backward()


def test_a_bf16_mixed_run_trains_with_finite_metrics(tmp_path):
    from mhpo.trainer.config import load_config
    from mhpo.trainer.loop import run_training

    reward = tmp_path / "length.py"  # a dense reward, so that the untrained model gets advantages
    reward.write_text("def length(prompts, completions, **_):\n    return [len(c) / 5 for c in completions]\n")
    cfg = load_config(
        None,
        [
            "model.dtype=bf16-mixed",
            "warmup.enabled=off",
            f"rewards.functions=[{reward}:length]",
            "train.steps=2",
            "rollout.prompts_per_step=4",
            "rollout.group_size=4",
            "eval.size=4",
            "eval.pass_k=0",
            "train.progress=false",
            "train.plots=false",
            "train.report_to=[]",
            "train.final_checkpoint=none",
        ],
    )
    run_training(cfg, tmp_path / "run", resume="never")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for record in lines:
        assert record["grad_norm"] > 0
        for key, value in record.items():
            if isinstance(value, float):
                assert math.isfinite(value), (key, value)


def test_machine_info_records_the_cpu_and_its_bf16_flags():
    from mhpo.models.device import machine_info

    text = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16 sse\n"
    info = machine_info(text)
    assert info["cpu"] == "AMD EPYC" and info["cpu_flags"] == ["avx2", "avx512_bf16", "avx512f"]
    assert info["cpu_bf16"] is True and info["torch"]
    assert machine_info("model name\t: old\nflags\t\t: avx2\n")["cpu_bf16"] is False
