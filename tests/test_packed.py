"""Linear layers through oneDNN with packed weights while decoding (mhpo.models.packed): the same
products up to float32 rounding, only where they apply, and every module back as it was afterwards."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from mhpo.generation import decode
from mhpo.generation.prompts import PromptEncoder
from mhpo.generation.rollout import sample
from mhpo.models import packed
from mhpo.models.packed import OPT_OUT, onednn_usable, packable, packed_linears
from mhpo.models.tiny import build_tiny, seeded_init, tiny_text_config
from mhpo.models.tokens import neutral_generation_config
from mhpo.tasks import Example
from mhpo.trainer.config import TinyModelConfig
from mhpo.trainer.update import rollout_logprobs

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    # CI and the machines this was measured on are x86 Linux; elsewhere nothing is packed (tested below).
    pytest.mark.skipif(not onednn_usable(torch.device("cpu")), reason="packing needs an x86 CPU with oneDNN"),
]

CPU = torch.device("cpu")


def _linear(k=64, n=48, bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(k, n, bias=bias)


def _own_forwards(module: torch.nn.Module) -> bool:
    return all("forward" not in vars(m) for m in module.modules())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 64), (3, 7, 64), (0, 64)])
def test_packed_product_equals_f_linear(bias, shape):
    layer = _linear(bias=bias)
    x = torch.randn(*shape)
    want = layer(x)
    with torch.no_grad(), packed_linears(layer, rows=8, min_elements=0) as n:
        assert n == 1 and "forward" in vars(layer)
        got = layer(x)
        strided = layer(torch.randn(64, *shape[:-1]).movedim(0, -1))  # a non-contiguous input
    assert _own_forwards(layer)
    assert got.shape == want.shape and strided.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_with_gradients_on_the_module_runs_its_own_forward():
    layer = _linear()
    x = torch.randn(4, 64)
    with packed_linears(layer, min_elements=0) as n:
        assert n == 1
        y = layer(x)  # gradients on: F.linear, differentiable, bit for bit
        y.sum().backward()
    assert torch.equal(y, torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert layer.weight.grad is not None


def test_weights_changed_between_blocks_are_packed_again():
    layer = _linear()
    x = torch.randn(4, 64)
    with torch.no_grad():
        with packed_linears(layer, min_elements=0):
            before = layer(x)
        layer.weight.mul_(2.0)
        with packed_linears(layer, min_elements=0):
            after = layer(x)
    torch.testing.assert_close(after - layer.bias, 2 * (before - layer.bias), rtol=1e-5, atol=1e-5)


def test_the_modules_are_restored_when_the_block_raises():
    model = torch.nn.Sequential(_linear(), torch.nn.ReLU(), _linear(48, 32))
    with pytest.raises(RuntimeError, match="inside"), packed_linears(model, min_elements=0) as n:
        assert n == 2
        raise RuntimeError("inside")
    assert _own_forwards(model)


class _Subclass(torch.nn.Linear):
    """Stands for LoRA's and quantised layers: Linear subclasses keep their own forward."""


def test_only_plain_large_float32_linears_are_packed():
    small, large = _linear(8, 8), _linear(64, 48)
    assert not packable(small, 100) and packable(large, 100)
    assert packable(small, 0)
    assert not packable(_Subclass(64, 48), 0)
    assert not packable(_linear().to(torch.bfloat16), 0)
    hooked = _linear()
    hooked.forward = lambda x: x  # e.g. accelerate's hooks replace forward on the instance
    assert not packable(hooked, 0)
    assert not packable(torch.nn.Conv1d(4, 4, 1), 0)
    # The default bound (MIN_ELEMENTS entries) leaves a small weight alone and takes a large one.
    assert not packable(_linear(64, 48)) and packable(torch.nn.Linear(576, 192))


def test_nothing_is_packed_under_autocast_or_when_switched_off(monkeypatch):
    layer = _linear()
    with torch.autocast("cpu", dtype=torch.bfloat16), packed_linears(layer, min_elements=0) as n:
        assert n == 0 and _own_forwards(layer)
    monkeypatch.setenv(OPT_OUT, "0")
    with packed_linears(layer, min_elements=0) as n:
        assert n == 0 and _own_forwards(layer)


def test_other_machines_and_devices_are_left_alone(monkeypatch):
    monkeypatch.setattr(packed.platform, "machine", lambda: "arm64")
    assert not onednn_usable(CPU)
    layer = _linear()
    with packed_linears(layer, min_elements=0) as n:
        assert n == 0 and _own_forwards(layer)
    monkeypatch.undo()
    assert not onednn_usable(torch.device("meta"))


@pytest.fixture(scope="module")
def models():
    """The built-in tiny model (nothing packed at the default bound) and a sharper tiny Qwen2 whose
    greedy completions vary, with prompts."""
    tiny, tok = build_tiny(TinyModelConfig(hidden_size=32, num_layers=2, intermediate_size=64), seed=3)
    sizes = tiny_text_config(tok, hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=128)
    sharp = seeded_init(Qwen2ForCausalLM, Qwen2Config(initializer_range=0.2, **sizes), seed=5)
    neutral_generation_config(sharp)
    prompts = PromptEncoder(tok, chat=False)([Example(p, "") for p in ("12+7=", "3+4=", "100+200=", "9=")])
    return tiny.eval(), sharp.eval(), tok, prompts


def test_decode_packs_its_model_once_per_call_and_restores_it(models, monkeypatch):
    tiny, sharp, tok, prompts = models
    calls = []
    real = packed._packed_forward

    def counting(module, weight):
        calls.append(module)
        return real(module, weight)

    monkeypatch.setattr(packed, "_packed_forward", counting)
    run = dict(group_size=3, max_new_tokens=6, eos_ids=[2], pad_id=tok.pad_token_id, do_sample=False)
    decode(tiny, **prompts, **run)
    assert calls == []  # the tiny model's weights are under the bound: F.linear throughout
    monkeypatch.setattr(packed, "MIN_ELEMENTS", 0)
    decode(sharp, **prompts, **run)
    linears = [m for m in sharp.modules() if type(m) is torch.nn.Linear]
    assert sorted(map(id, calls)) == sorted(map(id, linears))  # every Linear, the LM head included, once
    assert _own_forwards(sharp)


@pytest.mark.parametrize("do_sample, temperature", [(False, 1.0), (True, 1.3), (True, 0.6)])
def test_packed_decoding_samples_what_f_linear_does(models, monkeypatch, do_sample, temperature):
    """Same seed, packed or not: the same tokens, log-probs within float32 rounding, and the sampler's
    log-probs within 3e-5 of the trainer's recompute, which never packs (two kernels' rounding of the
    logits, divided by T = 0.6: 1.3e-5 measured)."""
    _, sharp, tok, prompts = models
    monkeypatch.setattr(packed, "MIN_ELEMENTS", 0)
    settings = dict(group_size=4, max_new_tokens=10, eos_ids=[2], do_sample=do_sample, temperature=temperature)
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(OPT_OUT, flag)
        torch.manual_seed(0)
        out[flag] = sample(sharp, tok, prompts, top_k=0, top_p=1.0, batch_size=16, **settings)
    plain, fast = out["0"], out["1"]
    assert torch.equal(plain.input_ids, fast.input_ids) and torch.equal(plain.completion_mask, fast.completion_mask)
    torch.testing.assert_close(fast.logprobs, plain.logprobs, rtol=0, atol=1e-5)
    recomputed, _ = rollout_logprobs(sharp, fast, temperature=temperature)
    assert (recomputed - fast.logprobs).abs().max() <= 3e-5
