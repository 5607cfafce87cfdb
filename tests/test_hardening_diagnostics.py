"""Hardening: the cheap diagnostics give the exact numbers of a float64 sort-based reference, on
every path (fused sink, generic chunks, sample thresholds that hit or miss, ties), and a step's
percentiles over micro-batches are the percentiles of all its tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mhpo import policy_loss
from mhpo.objectives import diagnostics as D
from mhpo.objectives import mhpo_fused


def _reference(logp, old, mask):
    """Nearest-rank order statistics of the masked log r in float64 (sorting everything)."""
    lr = (logp.detach().double() - old.double())[mask].sort().values
    a = lr.abs().sort().values
    n = lr.numel()
    k = lambda q: D.nearest_rank(q, n) - 1  # noqa: E731
    return {
        "ratio/min": float(lr[0].exp()),
        "ratio/max": float(lr[-1].exp()),
        "ratio/p1": float(lr[k(0.01)].exp()),
        "ratio/p99": float(lr[k(0.99)].exp()),
        "log_ratio/abs_p99": float(a[k(0.99)]),
        "ratio/mean": float(lr.exp().mean()),
        "log_ratio/abs_mean": float(lr.abs().mean()),
    }


def _inputs(seed, B, T, scale, density, ties):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 4
    step = scale * torch.randn(B, T, generator=g)
    if ties:
        step = torch.where(torch.rand(B, T, generator=g) < ties, 0.0, step)  # exact zeros: r = 1
    mask = torch.rand(B, T, generator=g) < density
    return (old + step).requires_grad_(True), old, torch.randn(B, generator=g), mask


@pytest.mark.parametrize("sample", [D.SAMPLE, 600])  # the default, and a tiny sample whose thresholds often miss
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 10**6),
    B=st.integers(1, 24),
    T=st.sampled_from([1, 7, 64, 300]),
    scale=st.sampled_from([0.0, 1e-3, 0.3, 5.0]),
    density=st.sampled_from([0.05, 0.5, 1.0]),
    ties=st.sampled_from([0.0, 0.5, 0.99]),
    impl=st.sampled_from(["auto", "reference"]),
)
def test_stats_equal_a_float64_sort_reference(monkeypatch, sample, seed, B, T, scale, density, ties, impl):
    monkeypatch.setattr(D, "SAMPLE", sample)
    monkeypatch.setattr(D, "MIN_SAMPLE", 16)
    monkeypatch.setattr(D, "CHUNK", 97)  # many chunks, with a ragged last one (generic path) ...
    monkeypatch.setattr(mhpo_fused, "CHUNK", 131)  # ... and in the fused kernel
    logp, old, adv, mask = _inputs(seed, B, T, scale, density, ties)
    _, stats = policy_loss("mhpo", logp, old, adv, mask, impl=impl)
    if not mask.any():
        assert stats["tokens"] == 0 and stats["ratio/p99"] == 0.0
        return
    ref = _reference(logp, old, mask)
    for key in ("ratio/min", "ratio/max", "ratio/p1", "ratio/p99", "log_ratio/abs_p99"):
        assert stats[key] == pytest.approx(ref[key], rel=1e-6, abs=0), key  # the same float32 element, exp'd
    assert stats["ratio/mean"] == pytest.approx(ref["ratio/mean"], rel=1e-5)
    assert stats["log_ratio/abs_mean"] == pytest.approx(ref["log_ratio/abs_mean"], rel=1e-5, abs=1e-9)
    assert stats["tokens"] == int(mask.sum())


def test_quantiles_are_exact_elements_and_fused_equals_reference():
    logp, old, adv, mask = _inputs(1, 64, 4096, 0.3, 0.9, 0.0)
    _, fused = policy_loss("mhpo", logp, old, adv, mask)
    _, plain = policy_loss("mhpo", logp, old, adv, mask, impl="reference")
    lr = (logp.detach() - old)[mask]
    assert torch.isin(torch.tensor(np.log(fused["ratio/p99"]), dtype=torch.float32), lr) or any(
        abs(float(v) - np.log(fused["ratio/p99"])) < 1e-6 for v in lr.topk(5000).values
    )
    for key in ("ratio/p1", "ratio/p99", "ratio/min", "ratio/max", "log_ratio/abs_p99", "clip_frac", "tokens"):
        assert fused[key] == plain[key], key
    for key in ("ratio/mean", "multiplier/mean", "mhpo/psi_mean", "mhpo/zeta_mean", "mhpo/survival_mean", "loss"):
        assert fused[key] == pytest.approx(plain[key], rel=1e-5), key


def test_tail_thresholds_select_few_tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 18, generator=g)
    lo, hi = D.tail_bounds(x[::8], x.numel())
    kept = ((x < lo) | (x > hi)).float().mean()
    assert 0.02 < float(kept) < 0.04  # ~1.3% per tail, not every token


def test_micro_batch_percentiles_are_the_step_percentiles():
    from mhpo.trainer.update import combine_micro

    logp, old, adv, mask = _inputs(3, 16, 512, 0.4, 0.8, 0.0)
    _, whole = policy_loss("mhpo", logp, old, adv, mask)
    parts, lrs = [], []
    for rows in (slice(0, 5), slice(5, 16)):
        _, s = policy_loss("mhpo", logp[rows], old[rows], adv[rows], mask[rows])
        parts.append(s)
        lrs.append(D.masked_log_ratio(logp[rows], old[rows], mask[rows]))
    exact = combine_micro(parts, torch.cat(lrs))
    for key in ("ratio/p1", "ratio/p99", "ratio/min", "ratio/max", "log_ratio/abs_p99", "tokens"):
        assert exact[key] == whole[key], key
    bound = combine_micro(parts)  # without the log-ratios: the extreme micro-batch's percentile
    assert bound["ratio/p99"] == max(p["ratio/p99"] for p in parts) != whole["ratio/p99"]


@pytest.mark.parametrize("bounds", [(-100.0, 100.0), (0.05, 0.2), (-0.2, -0.05), (-1e-3, 1e-3), None])
def test_wrong_or_one_sided_thresholds_still_give_the_exact_values(monkeypatch, bounds):
    """Thresholds that miss (too wide: the exact fallback), lie on one side of 0 (the |x - mid| cut)
    or keep nearly everything give the same numbers."""
    monkeypatch.setattr(D, "tail_bounds", lambda sample, n: bounds)
    logp, old, adv, mask = _inputs(5, 32, 256, 0.3, 0.7, 0.2)
    ref = _reference(logp, old, mask)
    for impl in ("auto", "reference"):
        _, stats = policy_loss("mhpo", logp, old, adv, mask, impl=impl)
        for key in ("ratio/min", "ratio/max", "ratio/p1", "ratio/p99", "log_ratio/abs_p99"):
            assert stats[key] == pytest.approx(ref[key], rel=1e-6, abs=0), (impl, key)
