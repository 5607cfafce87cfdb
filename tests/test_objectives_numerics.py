"""Extreme inputs, low precision, degenerate batches, bad input, and the diagnostics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mhpo import AGG_MODES, OBJECTIVES, policy_loss

NAMES = list(OBJECTIVES)


def extreme_batch(dtype):
    """Finite but extreme log-probs: ratios from e^-2e4 to e^2e4 plus the 1e-30..1e30 span."""
    g = torch.Generator().manual_seed(0)
    B, T = 6, 40
    spans = torch.tensor([-2e4, -1e3, -math.log(1e30), -5, -0.5, 0, 0.5, 5, math.log(1e30), 1e3, 2e4])
    lr = spans[torch.randint(0, len(spans), (B, T), generator=g)]
    old = torch.where(lr > 0, torch.full_like(lr, -3e4), torch.zeros_like(lr))
    old[0] = -1e4
    logp = (old + lr).clamp(-3e4, 0)
    adv = torch.tensor([3.0, -3.0, 1e-3, -1e-3, 0.0, 2.5])
    mask = torch.rand(B, T, generator=g) < 0.8
    ref = (logp + torch.randn(B, T, generator=g) * 50).clamp(-3e4, 0)
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask, ref.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # float16 (max 65504) cannot hold such gradients
@pytest.mark.parametrize("name", NAMES)
def test_no_nan_or_inf_in_loss_or_gradient(name, dtype):
    logp, old, adv, mask, ref = extreme_batch(dtype)
    for agg in AGG_MODES:
        x = logp.clone().requires_grad_(True)
        loss, stats = policy_loss(name, x, old, adv, mask, agg=agg, ref_logp=ref, beta=0.01)
        loss.backward()
        assert torch.isfinite(loss), (name, agg, loss)
        assert x.grad.dtype == dtype
        assert torch.isfinite(x.grad).all(), (name, agg)
        assert all(math.isfinite(v) for v in stats.values()), stats


@pytest.mark.parametrize("name", NAMES)
def test_empty_mask_gives_zero_loss_and_gradient(name):
    logp = torch.randn(3, 5, requires_grad=True)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    for agg in AGG_MODES:
        loss, stats = policy_loss(name, logp, logp.detach() - 1, torch.randn(3), mask, agg=agg)
        (g,) = torch.autograd.grad(loss, logp)
        assert float(loss.detach()) == 0.0 and torch.all(g == 0)
        assert stats["tokens"] == 0 and all(math.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("name", NAMES)
def test_all_equal_rewards_give_zero_gradient(name):
    """Equal rewards in a group -> zero advantages -> no policy gradient, whatever the ratio."""
    logp = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    old = logp.detach() + torch.randn(4, 6, dtype=torch.float64)
    loss, _ = policy_loss(name, logp, old, torch.zeros(4, dtype=torch.float64), torch.ones(4, 6, dtype=torch.bool))
    (g,) = torch.autograd.grad(loss, logp)
    assert float(loss.detach()) == 0.0 and torch.all(g == 0)


def test_half_precision_matches_float32_computation():
    logp, old, adv, mask, _ = extreme_batch(torch.float32)
    logp, old = logp.clamp(-20, 0), old.clamp(-20, 0)
    bf = policy_loss("mhpo", logp.bfloat16(), old.bfloat16(), adv.bfloat16(), mask, stats=False)[0]
    f32 = policy_loss(
        "mhpo", logp.bfloat16().float(), old.bfloat16().float(), adv.bfloat16().float(), mask, stats=False
    )[0]
    assert bf.dtype == torch.float32
    torch.testing.assert_close(bf, f32, rtol=0, atol=0)


@pytest.mark.parametrize("arg", ["logp", "old_logp", "advantages", "ref_logp"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_input_names_the_argument(arg, bad):
    t = {
        "logp": torch.zeros(2, 3),
        "old_logp": torch.zeros(2, 3),
        "advantages": torch.zeros(2),
        "ref_logp": torch.zeros(2, 3),
    }
    t[arg].view(-1)[1] = bad
    with pytest.raises(ValueError, match=f"'{arg}' contains NaN or inf"):
        policy_loss("mhpo", t["logp"], t["old_logp"], t["advantages"], torch.ones(2, 3), ref_logp=t["ref_logp"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(old_logp=torch.zeros(2, 4)), r"'old_logp' has shape \(2, 4\); expected \(2, 3\)"),
        (dict(advantages=torch.zeros(3)), r"'advantages' has shape \(3,\); expected \(2,\) or \(2, 3\)"),
        (dict(mask=torch.ones(3, 2)), r"'mask' has shape \(3, 2\)"),
        (dict(logp=torch.zeros(6)), r"'logp' must have shape \[B, T\]; got \(6,\)"),
        (dict(mask=torch.full((2, 3), 0.5)), r"'mask' must be bool or hold only 0 and 1"),
        (dict(logp=torch.zeros(2, 3, dtype=torch.long)), r"'logp' must be a floating-point tensor"),
        (dict(ref_logp=torch.zeros(2, 2)), r"'ref_logp' has shape \(2, 2\)"),
    ],
)
def test_bad_shapes_and_types_are_named(kwargs, message):
    args = dict(logp=torch.zeros(2, 3), old_logp=torch.zeros(2, 3), advantages=torch.zeros(2), mask=torch.ones(2, 3))
    ref = kwargs.pop("ref_logp", None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        policy_loss("grpo", args["logp"], args["old_logp"], args["advantages"], args["mask"], ref_logp=ref)


def call(name="mhpo", **kw):
    x = torch.zeros(2, 3)
    return policy_loss(name, x, x, torch.zeros(2), torch.ones(2, 3), **kw)


def test_unknown_objective_lists_valid_choices():
    with pytest.raises(ValueError) as err:
        call("mhpoo")
    msg = str(err.value)
    assert "unknown objective 'mhpoo'" in msg and "did you mean 'mhpo'" in msg
    assert all(n in msg for n in NAMES)


def test_unknown_hparam_lists_valid_hparams():
    with pytest.raises(
        ValueError, match=r"unknown hparam 'lambda_p'.*valid hparams: c, k_pos, lambda_pos, k_neg, lambda_neg, lfm, dhp"
    ):
        call(lambda_p=1.0)
    with pytest.raises(
        ValueError, match=r"objective 'grpo': unknown hparam 'c'; valid hparams: eps_low, eps_high, dual_clip"
    ):
        call("grpo", c=1.0)


@pytest.mark.parametrize(
    "hp, rule",
    [
        (dict(c=0.0), "c=0.0 is out of range; it must be > 0"),
        (dict(c=-1), "c=-1 is out of range; it must be > 0"),
        (dict(lambda_pos=0), "lambda_pos=0 is out of range; it must be > 0"),
        (dict(lambda_neg=-0.5), "lambda_neg=-0.5 is out of range"),
        (dict(k_pos=0), "k_pos=0 is out of range; it must be > 0"),
        (dict(k_neg=-2.0), "k_neg=-2.0 is out of range"),
        (dict(c=float("nan")), "c=nan is out of range"),
        (dict(c="big"), "c='big' must be a number"),
        (dict(lfm=1), "lfm=1 must be true or false"),
    ],
)
def test_out_of_range_hparams_are_named(hp, rule):
    with pytest.raises(ValueError, match=re_escape(rule)):
        call(**hp)


def re_escape(s):
    import re

    return re.escape(s)


def test_other_bad_options():
    with pytest.raises(
        ValueError,
        match="unknown aggregation 'mean'; valid aggregations: token-mean, seq-mean-token-mean, "
        "seq-mean-token-sum-norm",
    ):
        call(agg="mean")
    with pytest.raises(ValueError, match="beta=0.1 needs 'ref_logp'"):
        call(beta=0.1)
    with pytest.raises(ValueError, match="beta=-1 must be a number >= 0"):
        call(beta=-1, ref_logp=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="num_tokens=0 must be a positive count"):
        call(num_tokens=0)
    with pytest.raises(ValueError, match="eps_low=1.0 is out of range; it must be in \\[0, 1\\)"):
        call("grpo", eps_low=1.0)
    with pytest.raises(ValueError, match="floor=6.0 must be below cap=5.0"):
        call("cispo", floor=6.0)


# ---------------------------------------------------------------------------------------------
# Diagnostics, recomputed independently with numpy


def test_diagnostics_match_independent_computation():
    g = torch.Generator().manual_seed(4)
    B, T = 8, 50
    old = torch.randn(B, T, generator=g, dtype=torch.float64) - 2
    lr = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.6
    logp = old + lr
    mask = torch.rand(B, T, generator=g) < 0.7
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    refp = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    _, s = policy_loss("mhpo", logp, old, adv, mask, ref_logp=refp)

    x = lr.numpy()[mask.numpy()]
    r = np.exp(x)
    n = len(x)
    order = np.sort(r)
    assert s["tokens"] == n
    assert s["ratio/mean"] == pytest.approx(r.mean(), rel=1e-12)
    assert s["ratio/min"] == pytest.approx(r.min(), rel=1e-12)
    assert s["ratio/max"] == pytest.approx(r.max(), rel=1e-12)
    assert s["ratio/p1"] == pytest.approx(order[round(0.01 * (n - 1))], rel=1e-12)
    assert s["ratio/p99"] == pytest.approx(order[round(0.99 * (n - 1))], rel=1e-12)
    assert s["log_ratio/abs_mean"] == pytest.approx(np.abs(x).mean(), rel=1e-12)
    assert s["log_ratio/abs_p99"] == pytest.approx(np.sort(np.abs(x))[round(0.99 * (n - 1))], rel=1e-12)

    psi = 1.5 * np.tanh(x / 1.5)
    sp = np.log1p(np.exp(psi))
    zeta = sp**1.5 + ((sp - psi) / 0.8) ** 2
    mult = np.exp(psi - zeta) / np.cosh(x / 1.5) ** 2
    m1 = math.exp(-(math.log(2) ** 1.5) - (math.log(2) / 0.8) ** 2)
    assert s["mhpo/psi_mean"] == pytest.approx(psi.mean(), rel=1e-12)
    assert s["mhpo/zeta_mean"] == pytest.approx(zeta.mean(), rel=1e-12)
    assert s["mhpo/survival_mean"] == pytest.approx(np.exp(-zeta).mean(), rel=1e-12)
    assert s["multiplier/mean"] == pytest.approx(mult.mean(), rel=1e-12)
    assert s["clip_frac"] == pytest.approx((mult < 0.1 * m1).mean(), rel=1e-12)
    assert 0 < s["clip_frac"] < 1
    d = (refp - logp).numpy()[mask.numpy()]
    assert s["kl"] == pytest.approx((np.exp(d) - d - 1).mean(), rel=1e-12)


def test_clip_fraction_counts_hard_clipped_tokens():
    lr = torch.log(torch.tensor([[0.5, 0.9, 1.0, 1.1, 1.3, 2.0]], dtype=torch.float64))
    for adv, expected in ((1.0, 2 / 6), (-1.0, 1 / 6)):
        _, s = policy_loss(
            "grpo", lr, torch.zeros_like(lr), torch.tensor([adv], dtype=torch.float64), torch.ones_like(lr)
        )
        assert s["clip_frac"] == pytest.approx(expected)
