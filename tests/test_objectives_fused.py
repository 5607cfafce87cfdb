"""The fused MHPO kernel equals the reference autograd path: loss, gradient and diagnostics."""

from __future__ import annotations

import pytest
import torch

from mhpo import AGG_MODES, policy_loss
from mhpo.objectives.mhpo_formula import hazard
from mhpo.objectives.mhpo_fused import CHUNK

FUSED = ["mhpo", "mhpo-symmetric", "mhpo-rescaled"]


def run(name, logp, old, adv, mask, impl, **kw):
    x = logp.clone().requires_grad_(True)
    loss, stats = policy_loss(name, x, old, adv, mask, impl=impl, **kw)
    loss.backward()
    return loss.detach(), x.grad, stats


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, CHUNK // 2 + 13)])  # the last spans 3 chunks
def test_fused_equals_reference(name, dtype, tol, shape):
    g = torch.Generator().manual_seed(shape[1])
    old = torch.randn(*shape, generator=g, dtype=dtype) - 3
    logp = old + torch.randn(*shape, generator=g, dtype=dtype) * 2
    logp.view(-1)[:: max(shape[1] // 3, 1)] += 60.0  # some ratios ~e^60
    mask = torch.rand(*shape, generator=g) < 0.8
    adv = torch.randn(shape[0], generator=g, dtype=dtype)
    refp = old + 0.1
    for agg in AGG_MODES:
        kw = dict(agg=agg, ref_logp=refp, beta=0.05)
        l_ref, g_ref, s_ref = run(name, logp, old, adv, mask, "reference", **kw)
        l_fast, g_fast, s_fast = run(name, logp, old, adv, mask, "auto", **kw)
        torch.testing.assert_close(l_fast, l_ref, rtol=tol, atol=tol)
        torch.testing.assert_close(g_fast, g_ref, rtol=tol, atol=tol * 1e-3)
        assert s_fast.keys() == s_ref.keys()
        for k in s_ref:
            assert s_fast[k] == pytest.approx(s_ref[k], rel=tol * 10, abs=tol), k


def test_fused_per_token_advantages_and_bf16():
    g = torch.Generator().manual_seed(1)
    old = torch.randn(4, 9, generator=g) - 3
    logp = old + torch.randn(4, 9, generator=g)
    adv = torch.randn(4, 9, generator=g)
    mask = torch.rand(4, 9, generator=g) < 0.7
    for lp, o in ((logp, old), (logp.bfloat16(), old.bfloat16())):
        l_ref, g_ref, _ = run("mhpo", lp, o, adv, mask, "reference")
        l_fast, g_fast, _ = run("mhpo", lp, o, adv, mask, "auto")
        assert g_fast.dtype == lp.dtype
        torch.testing.assert_close(l_fast, l_ref)
        torch.testing.assert_close(g_fast, g_ref)


@pytest.mark.parametrize("k", [0.5, 1.0, 1.5, 2.0, 0.7, 3.3])
def test_hazard_special_cases_equal_pow(k):
    s = torch.rand(1000, dtype=torch.float64) * 3
    torch.testing.assert_close(hazard(s, k, 0.8), (s / 0.8).pow(k), rtol=1e-13, atol=1e-15)


def test_fused_path_is_used_and_falls_back_for_ablations():
    from mhpo import get_objective

    x = torch.zeros(2, 3)
    coef = torch.ones(2, 3)
    hp = get_objective("mhpo").defaults
    assert get_objective("mhpo").fast(x, x, coef, False, **hp) is not None
    assert get_objective("mhpo-lfm-only").fast(x, x, coef, False, **get_objective("mhpo-lfm-only").defaults) is None
    assert get_objective("grpo").fast(x, x, coef, False, **get_objective("grpo").defaults) is None
    with pytest.raises(ValueError, match="unknown impl .fast.; valid: auto, compile, reference"):
        policy_loss("mhpo", x, x, torch.zeros(2), torch.ones(2, 3), impl="fast")


def _cxx() -> str | None:
    """A C++ compiler for torch.compile's CPU backend (inductor), as it looks for one."""
    import os
    import shutil

    return next(filter(None, (shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++"))), None)


@pytest.mark.skipif(_cxx() is None, reason="no C++ compiler (c++, g++, clang++): torch.compile builds no CPU kernel")
def test_compiled_kernel_equals_reference():
    """The torch.compile opt-in (impl="compile") gives the reference numbers, across shapes."""
    for shape in ((3, 7), (4, 1000)):
        g = torch.Generator().manual_seed(shape[1])
        old = torch.randn(*shape, generator=g) - 3
        logp = old + torch.randn(*shape, generator=g) * 2
        mask = torch.rand(*shape, generator=g) < 0.8
        adv = torch.randn(shape[0], generator=g)
        l_ref, g_ref, s_ref = run("mhpo", logp, old, adv, mask, "reference", agg="seq-mean-token-mean")
        l_c, g_c, s_c = run("mhpo", logp, old, adv, mask, "compile", agg="seq-mean-token-mean")
        torch.testing.assert_close(l_c, l_ref)
        torch.testing.assert_close(g_c, g_ref)
        for k in s_ref:
            assert s_c[k] == pytest.approx(s_ref[k], rel=1e-5, abs=1e-6), k


def test_auto_compiles_the_fused_kernel_on_cuda_only(monkeypatch):
    import mhpo.objectives.loss as loss

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(loss, "_has_triton", lambda: True)
    assert [loss.use_compiled_kernel(i, cpu) for i in ("auto", "compile", "reference")] == [False, True, False]
    assert [loss.use_compiled_kernel(i, cuda) for i in ("auto", "compile", "reference")] == [True, True, False]
    monkeypatch.setattr(loss, "_has_triton", lambda: False)  # no triton: the eager fused kernel
    assert not loss.use_compiled_kernel("auto", cuda)
