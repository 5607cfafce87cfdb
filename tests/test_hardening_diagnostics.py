"""Hardening: the diagnostics against a float64 sort-based reference. Means, min / max and counts
are exact on every path (fused sink, generic chunks); the percentiles are exact up to SAMPLE masked
tokens and, above, within half a percentile (in rank) of the exact ones; nothing is NaN or inf."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mhpo import policy_loss
from mhpo.objectives import diagnostics as D
from mhpo.objectives import mhpo_fused

ORDER = ("ratio/min", "ratio/max", "ratio/p1", "ratio/p99", "log_ratio/abs_p99")
QUANTILES = {"ratio/p1": (0.01, False), "ratio/p99": (0.99, False), "log_ratio/abs_p99": (0.99, True)}


def _reference(logp, old, mask):
    """Nearest-rank order statistics and means of the masked log r in float64 (sorting everything)."""
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


def _finite(stats):
    return all(math.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("sample", [D.SAMPLE, 50])  # the default (exact at these sizes), and a tiny sample
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 10**6),
    B=st.integers(1, 24),
    T=st.sampled_from([1, 7, 64, 300]),
    scale=st.sampled_from([0.0, 1e-3, 0.3, 5.0]),
    density=st.sampled_from([0.05, 0.5, 1.0]),
    ties=st.sampled_from([0.0, 0.5, 0.99]),
)
def test_stats_against_a_float64_sort_reference(monkeypatch, sample, seed, B, T, scale, density, ties):
    """min / max / means exact on both paths; percentiles exact below SAMPLE tokens, else elements
    of the masked log r, the same on the fused and the reference path (the same sample)."""
    monkeypatch.setattr(D, "SAMPLE", sample)
    monkeypatch.setattr(D, "CHUNK", 97)  # many chunks, with a ragged last one (generic path) ...
    monkeypatch.setattr(mhpo_fused, "CHUNK", 131)  # ... and in the fused kernel
    logp, old, adv, mask = _inputs(seed, B, T, scale, density, ties)
    _, fused = policy_loss("mhpo", logp, old, adv, mask)
    _, plain = policy_loss("mhpo", logp, old, adv, mask, impl="reference")
    assert _finite(fused) and _finite(plain)
    if not mask.any():
        assert fused["tokens"] == 0 and fused["ratio/p99"] == 0.0
        return
    ref = _reference(logp, old, mask)
    lr = (logp.detach() - old)[mask].double()
    for stats in (fused, plain):
        exact = ORDER if mask.sum() <= sample else ("ratio/min", "ratio/max")
        for key in exact:
            assert stats[key] == pytest.approx(ref[key], rel=1e-6, abs=0), key  # the same float32 element, exp'd
        for key in set(ORDER) - set(exact):
            v = stats[key] if key == "log_ratio/abs_p99" else math.log(stats[key])
            values = lr.abs() if key == "log_ratio/abs_p99" else lr
            assert float((values - v).abs().min()) <= 1e-6 * max(1.0, abs(v)), key  # an element
        assert stats["ratio/mean"] == pytest.approx(ref["ratio/mean"], rel=1e-5)
        assert stats["log_ratio/abs_mean"] == pytest.approx(ref["log_ratio/abs_mean"], rel=1e-5, abs=1e-9)
        assert stats["tokens"] == int(mask.sum())
    for key in ORDER:
        assert fused[key] == plain[key], key


def _heavy_tailed(seed=0, B=224, T=8192):
    """~1M masked tokens of heavy-tailed log r (Student t, 2 degrees of freedom) whose scale varies
    by row (log-normal), grows down the batch and along the sequence, masked to ragged prefixes with
    5% holes: a sample of the first tokens or rows is biased (the first 100 or SAMPLE tokens fail)."""
    g = torch.Generator().manual_seed(seed)
    t2 = torch.randn(B, T, generator=g) / torch.sqrt(-torch.log(torch.rand(B, T, generator=g)))
    rows = torch.exp(0.7 * torch.randn(B, 1, generator=g)) * (0.5 + 1.5 * torch.arange(B).view(B, 1) / B)  # [B, 1]
    scale = 0.05 * rows * (1 + 3 * torch.arange(T) / T)  # [B, T]
    old = -torch.rand(B, T, generator=g) * 5
    logp = old + (scale * t2).clamp(-60.0, 60.0)
    lengths = torch.randint(T // 8, T + 1, (B, 1), generator=g)
    mask = (torch.arange(T) < lengths) & (torch.rand(B, T, generator=g) > 0.05)
    return logp, old, torch.randn(B, generator=g), mask


def rank_error(values: torch.Tensor, estimate: float, q: float) -> float:
    """How far q lies outside [share of values < estimate, share <= estimate] (0 for an exact quantile)."""
    below = float((values < estimate).double().mean())
    at_or_below = float((values <= estimate).double().mean())
    return max(0.0, below - q, q - at_or_below)


def test_sampled_quantiles_are_within_half_a_percentile():
    logp, old, adv, mask = _heavy_tailed()
    lr = (logp - old)[mask]  # float32, as policy_loss forms it
    assert lr.numel() > 30 * D.SAMPLE  # ~1M
    _, fused = policy_loss("mhpo", logp, old, adv, mask)
    _, plain = policy_loss("grpo", logp, old, adv, mask)  # the generic path (objective_stats)
    merged = D.log_ratio_order_stats(lr)  # the trainer's micro-batch merge
    worst = 0.0
    for stats in (fused, plain, merged):
        assert stats["ratio/min"] == pytest.approx(math.exp(float(lr.min())), rel=1e-6)
        assert stats["ratio/max"] == pytest.approx(math.exp(float(lr.max())), rel=1e-6)
        for key, (q, absolute) in QUANTILES.items():
            est = stats[key] if absolute else math.log(stats[key])
            err = rank_error(lr.double().abs() if absolute else lr.double(), est, q)
            assert err < 0.005, (key, err)
            worst = max(worst, err)
    print(f"worst rank error over {lr.numel():,} tokens: {worst:.5f}")
    for key in ORDER:
        assert fused[key] == plain[key], key


def test_quantiles_are_masked_elements_and_fused_equals_reference():
    logp, old, adv, mask = _inputs(1, 64, 4096, 0.3, 0.9, 0.0)
    _, fused = policy_loss("mhpo", logp, old, adv, mask)
    _, plain = policy_loss("mhpo", logp, old, adv, mask, impl="reference")
    lr = (logp.detach() - old)[mask].double()
    assert float((lr - math.log(fused["ratio/p99"])).abs().min()) < 1e-6
    for key in (*ORDER, "clip_frac", "tokens"):
        assert fused[key] == plain[key], key
    for key in ("ratio/mean", "multiplier/mean", "mhpo/psi_mean", "mhpo/zeta_mean", "mhpo/survival_mean", "loss"):
        assert fused[key] == pytest.approx(plain[key], rel=1e-5), key


@pytest.mark.parametrize("n, width", [(1, 7), (D.SAMPLE, 8192), (D.SAMPLE + 1, 8192), (4_000_000, 8192), (10**7, 6)])
def test_the_sample_is_bounded_and_crosses_columns(n, width):
    pos = D.sample_positions(2 * n, width, n)
    assert math.gcd(pos.step, width) == 1
    assert (pos.step == 1) == (n <= D.SAMPLE)  # every token below SAMPLE
    assert D.SAMPLE / 3 <= n / pos.step <= D.SAMPLE or n <= D.SAMPLE  # the masked tokens it takes


def test_a_mask_periodic_with_the_stride_still_gives_a_full_sample():
    B, T = 24, 4097  # n = 49,164 masked: stride 2 (coprime to T), every sampled position masked out
    mask = (torch.arange(B * T) % 2 == 1).view(B, T)
    values = torch.randn(B * T)
    n = int(mask.sum())
    assert D.sample_positions(B * T, T, n).step == 2
    sample = D.log_ratio_sample(values.__getitem__, mask, n)
    assert sample.numel() == -(-n // 2)  # every other masked token instead: ceil(n / d), d = ceil(n / SAMPLE)
    assert torch.equal(sample, values[mask.view(-1)][::2])


def test_micro_batch_percentiles_are_the_step_percentiles():
    from mhpo.trainer.update import combine_micro

    logp, old, adv, mask = _inputs(3, 16, 512, 0.4, 0.8, 0.0)
    _, whole = policy_loss("mhpo", logp, old, adv, mask)
    parts, lrs = [], []
    for rows in (slice(0, 5), slice(5, 16)):
        _, s = policy_loss("mhpo", logp[rows], old[rows], adv[rows], mask[rows])
        parts.append(s)
        lrs.append(D.masked_log_ratio(logp[rows], old[rows], mask[rows]))
    merged = combine_micro(parts, torch.cat(lrs))
    for key in (*ORDER, "tokens"):
        assert merged[key] == whole[key], key  # below SAMPLE tokens: exact, both
    bound = combine_micro(parts)  # without the log-ratios: the extreme micro-batch's percentile
    assert bound["ratio/p99"] == max(p["ratio/p99"] for p in parts) != whole["ratio/p99"]


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("B, T", [(4, 9), (64, 2048)])  # below and above SAMPLE tokens
def test_degenerate_inputs_give_finite_stats(impl, B, T):
    g = torch.Generator().manual_seed(7)
    old = -torch.rand(B, T, generator=g) * 4
    adv = torch.randn(B, generator=g)
    ones = torch.ones(B, T, dtype=torch.bool)
    _, empty = policy_loss("mhpo", old.clone(), old, adv, torch.zeros(B, T, dtype=torch.bool), impl=impl)
    assert _finite(empty) and empty["tokens"] == 0 and all(empty[k] == 0.0 for k in ORDER)
    _, same = policy_loss("mhpo", old.clone(), old, adv, ones, impl=impl)  # on-policy: every log r = 0
    assert _finite(same) and all(same[k] == 1.0 for k in ORDER[:4]) and same["log_ratio/abs_p99"] == 0.0
    step = torch.full((B, T), 0.1)
    step.view(-1)[::97] = 100.0  # r = e^100 overflows float32
    far = old + step
    _, big = policy_loss("mhpo", far, old, adv, ones, impl=impl)
    assert _finite(big) and big["ratio/max"] == pytest.approx(math.exp(100.0), rel=1e-5)
    assert big["ratio/mean"] == pytest.approx(float((far - old).double().exp().mean()), rel=1e-5)
    lp = old + 0.3 * torch.randn(B, T, generator=g)
    _, half = policy_loss("mhpo", lp.bfloat16(), old.bfloat16(), adv.bfloat16(), ones, impl=impl)
    ref = _reference(lp.bfloat16().float(), old.bfloat16().float(), ones)
    assert _finite(half) and half["ratio/max"] == pytest.approx(ref["ratio/max"], rel=1e-6)
    assert half["ratio/p99"] == pytest.approx(ref["ratio/p99"], rel=0.05)


def test_order_stats_of_no_values_are_zero():
    assert D.log_ratio_order_stats(torch.zeros(0)) == dict.fromkeys(ORDER, 0.0)
    assert D.quantiles(torch.zeros(0), (0.5,)) == [0.0]
    assert np.isclose(D.quantiles(torch.arange(101.0), (0.01, 0.99)), [1.0, 99.0]).all()
