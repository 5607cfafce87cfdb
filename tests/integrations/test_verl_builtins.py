"""verl 0.9.1's built-in losses against our baselines, fed the same tensors (float64).

Where the definitions coincide the numbers must agree; where they differ by design, the test pins
the difference down (docs/verl.md, "verl built-ins and our baselines").
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed: pip install 'mhpo[verl]' (scripts/setup.sh --dev)")

from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.workers.config import ActorConfig

import verl  # noqa: F401
from mhpo import policy_loss

TIGHT = dict(rtol=1e-12, atol=1e-14)


def builtin(name: str, batch, agg: str = "token-mean", **actor_fields):
    logp, old, adv, mask = batch
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, loss_agg_mode=agg, **actor_fields)
    loss, _ = get_policy_loss_fn(name)(old, logp, adv, mask, agg, cfg)
    return loss


def ours(name: str, batch, agg: str = "token-mean", **hp):
    logp, old, adv, mask = batch
    return policy_loss(name, logp, old, adv, mask, agg=agg, **hp)[0]


def val(t: torch.Tensor) -> float:
    return float(t.detach())


def grad(loss, batch):
    return torch.autograd.grad(loss, batch[0])[0]


def assert_same(a, b, batch, **tol):
    torch.testing.assert_close(a, b, **(tol or TIGHT))
    torch.testing.assert_close(grad(a, batch), grad(b, batch), **(tol or TIGHT))


def with_log_ratios(batch, log_r):
    logp, old, adv, mask = batch
    return (old + log_r).clone().requires_grad_(True), old, adv, mask


# -- where the definitions coincide -------------------------------------------------------------------


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("ours_name,high", [("grpo", 0.2), ("dapo", 0.28)])
def test_vanilla_equals_ppo_clip_with_dual_clip_3(ours_name, high, agg, batch_factory):
    batch = batch_factory(10, spread=1.6, empty_row=True)  # r up to ~5: clipping and dual clip both hit
    assert_same(
        builtin("vanilla", batch, agg, clip_ratio_low=0.2, clip_ratio_high=high),
        ours(ours_name, batch, agg, dual_clip=3.0),
        batch,
    )


def test_vanilla_equals_grpo_without_dual_clip_while_r_stays_below_3(batch_factory):
    batch = batch_factory(11, spread=1.0)  # r <= e < 3: dual clip never fires
    assert_same(builtin("vanilla", batch), ours("grpo", batch), batch)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
@pytest.mark.parametrize("ours_name", ["gspo", "gspo-token"])
def test_gspo_equals_ours(ours_name, agg, batch_factory):
    batch = batch_factory(12, spread=0.01, empty_row=True)  # s within and beyond 1 +- 4e-4
    v = builtin("gspo", batch, agg, clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    assert_same(v, ours(ours_name, batch, agg), batch)


def test_sapo_equals_ours_with_seq_mean_token_mean(batch_factory):
    batch = batch_factory(13, spread=1.5, empty_row=True)
    # verl hard-codes seq-mean-token-mean: the mode passed in is ignored
    v = builtin("sapo", batch, "token-mean", tau_pos=1.0, tau_neg=1.05)
    # our sapo rounds tau to float32 before the float64 cast (~4e-8 relative; see the report)
    assert_same(v, ours("sapo", batch, "seq-mean-token-mean"), batch, rtol=1e-6, atol=1e-9)


def test_cispo_equals_ours_with_cap_and_floor_from_verl_clip_ratios(batch_factory):
    batch = batch_factory(14, spread=1.0, empty_row=True)
    v = builtin("cispo", batch, clip_ratio_low=0.2, clip_ratio_high=0.2)
    assert_same(v, ours("cispo", batch, cap=1.2, floor=0.8), batch)


def test_geo_mean_equals_gmpo_with_seq_mean_token_mean_and_no_empty_rows(batch_factory):
    batch = batch_factory(15, spread=1.0)
    v = builtin("geo_mean", batch, "token-mean", clip_ratio_low=0.4, clip_ratio_high=0.4)  # mode ignored
    assert_same(v, ours("gmpo", batch, "seq-mean-token-mean"), batch)


# -- where they differ by design ----------------------------------------------------------------------


def test_vanilla_dual_clip_is_off_in_our_grpo(batch_factory):
    batch = batch_factory(16, spread=0.6)
    logp, old, adv, mask = batch
    log_r = torch.where(adv < 0, torch.full_like(old, 2.0), logp.detach() - old)  # r = e^2 > 3 where A < 0
    batch = with_log_ratios(batch, log_r)
    v, o = builtin("vanilla", batch), ours("grpo", batch)
    assert abs(val(v - o)) > 1e-3
    assert_same(v, ours("grpo", batch, dual_clip=3.0), batch)


def test_verl_clamps_log_ratios_our_objectives_do_not(batch_factory):
    batch = batch_factory(17, spread=0.6)
    logp, old, adv, mask = batch
    # A > 0 and log r = 25: verl's vanilla clamps log r at 20, SAPO's gate sees r = e^20 instead of e^25;
    # both saturate, so values agree; the difference shows at log r = -25 (clamped to -20): r = 2e-9 vs 1e-11
    log_r = torch.where(adv > 0, torch.full_like(old, -25.0), logp.detach() - old)
    far = with_log_ratios(batch, log_r)
    d = abs(val(builtin("vanilla", far) - ours("grpo", far, dual_clip=3.0)))
    assert 1e-12 < d < 1e-8
    # GSPO: verl clamps log s at 10; for A < 0 the unclipped branch is s * A, so e^10 vs e^12
    log_r = torch.where(adv < 0, torch.full_like(old, 12.0), torch.zeros_like(old))
    far = with_log_ratios(batch, log_r)
    v = builtin("gspo", far, "seq-mean-token-mean", clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    o = ours("gspo", far, "seq-mean-token-mean")
    assert val(o) > 5 * val(v) > 0


def test_cispo_default_cap_is_trls_absolute_5_not_verls_1_2(batch_factory):
    batch = batch_factory(18, spread=1.0)
    v = builtin("cispo", batch, clip_ratio_low=0.2, clip_ratio_high=0.2)
    assert abs(val(v - ours("cispo", batch))) > 1e-3


def test_geo_mean_counts_empty_rows_and_ignores_micro_batching(batch_factory):
    """verl's geo_mean is a plain mean over the rows it is given: empty rows count, and with k
    micro-batches the summed loss (and gradient) is k times the mini-batch's; ours uses global counts."""
    batch = batch_factory(19, spread=1.0, empty_row=True)
    logp, old, adv, mask = batch
    B = mask.shape[0]
    v = builtin("geo_mean", batch, clip_ratio_low=0.4, clip_ratio_high=0.4)
    o = ours("gmpo", batch, "seq-mean-token-mean")
    n_nonempty = int((mask.sum(-1) > 0).sum())
    torch.testing.assert_close(v, o * n_nonempty / B, **TIGHT)
    # micro-batches of 2 rows: verl sums to 4x; ours (global counts) to 1x
    rows = [slice(i, i + 2) for i in range(0, B, 2)]
    micro = [tuple(t[s] for t in batch) for s in rows]
    summed_v = sum(builtin("geo_mean", m, clip_ratio_low=0.4, clip_ratio_high=0.4) for m in micro)
    torch.testing.assert_close(summed_v, len(rows) * v, **TIGHT)
    counts = {"num_seqs": n_nonempty}
    summed_o = sum(ours("gmpo", m, "seq-mean-token-mean", **counts) for m in micro)
    torch.testing.assert_close(summed_o, o, **TIGHT)
