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


# -- verl's own fixtures: per-token advantages and rollout-correction IS weights ----------------------------
#
# Rebuilt after verl's tests/trainer/ppo/test_rollout_corr_integration.py (sample_data): B = 4, T = 16,
# old / current / rollout log-probs and per-token advantages all ~ N(0, 1), IS weights from verl's own
# compute_rollout_correction_and_rejection_mask (rollout_is="token" or "sequence", threshold 2).

GSPO_CLIP = dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4)
GMPO_CLIP = dict(clip_ratio_low=0.4, clip_ratio_high=0.4)
PPO_CLIP = dict(clip_ratio_low=0.2, clip_ratio_high=0.2)


def verl_fixture(seed: int, *, adv: str = "token", is_level: str | None = "token", ragged: bool = False):
    """(logp, old, adv, mask, is_weights): adv "token" (verl's randn per token) or "sequence" (one per row);
    ragged=True gives rows of varied length (bool mask), else verl's all-ones float mask."""
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

    B, T = 4, 16
    g = torch.Generator().manual_seed(seed)
    old, logp, rollout, advantages = (torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(4))
    if adv == "sequence":
        advantages = advantages[:, :1].expand(B, T).clone()
    mask = torch.ones(B, T, dtype=torch.float64)
    if ragged:
        mask = torch.arange(T) < torch.randint(1, T + 1, (B, 1), generator=g)
    weights = None
    if is_level is not None:
        proto, _, _ = compute_rollout_correction_and_rejection_mask(
            old_log_prob=old,
            rollout_log_prob=rollout,
            response_mask=mask.double(),
            rollout_is=is_level,
            rollout_is_threshold=2.0,
            rollout_rs=None,
        )
        weights = proto.batch["rollout_is_weights"]
    return logp.requires_grad_(True), old, advantages, mask, weights


def run_loss(mode: str, fixture, agg: str, clip: dict, policy_loss_cfg=None):
    """(loss, d loss / d logp, metrics) of verl's registered loss ``mode`` on the fixture."""
    logp, old, adv, mask, weights = fixture
    fields = dict(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, loss_agg_mode=agg, **clip)
    if policy_loss_cfg is not None:
        fields["policy_loss"] = policy_loss_cfg
    loss, metrics = get_policy_loss_fn(mode)(old, logp, adv, mask, agg, ActorConfig(**fields), weights)
    return loss, grad(loss, fixture), metrics


def mhpo_cfg(mode: str, **hp):
    from mhpo.integrations.verl import MHPOPolicyLossConfig

    return MHPOPolicyLossConfig(loss_mode=mode, mhpo_hparams=hp)


@pytest.mark.parametrize("is_level", [None, "token", "sequence"])
@pytest.mark.parametrize("adv", ["token", "sequence"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_gspo_token_equals_verls_gspo_on_verls_fixtures(agg, adv, is_level):
    for seed in range(5):
        fixture = verl_fixture(seed, adv=adv, is_level=is_level, ragged=seed % 2 == 1)
        v_loss, v_grad, _ = run_loss("gspo", fixture, agg, GSPO_CLIP)
        o_loss, o_grad, _ = run_loss("mhpo.gspo-token", fixture, agg, {}, mhpo_cfg("mhpo.gspo-token"))
        torch.testing.assert_close(o_loss, v_loss, **TIGHT)
        torch.testing.assert_close(o_grad, v_grad, **TIGHT)


@pytest.mark.parametrize("is_level", [None, "sequence"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_gspo_equals_verls_gspo_where_advantages_and_is_weights_are_per_sequence(agg, is_level):
    for seed in range(5):
        fixture = verl_fixture(seed, adv="sequence", is_level=is_level, ragged=seed % 2 == 1)
        v_loss, v_grad, _ = run_loss("gspo", fixture, agg, GSPO_CLIP)
        o_loss, o_grad, _ = run_loss("mhpo.gspo", fixture, agg, {}, mhpo_cfg("mhpo.gspo"))
        torch.testing.assert_close(o_loss, v_loss, **TIGHT)
        torch.testing.assert_close(o_grad, v_grad, **TIGHT)


def unguarded(name: str, fixture, agg: str) -> torch.Tensor:
    """What the plug-in computed before it refused: agg_loss(token_losses(name).policy * IS weights)."""
    from verl.trainer.ppo.core_algos import agg_loss

    from mhpo.objectives.loss import token_losses

    logp, old, adv, mask, weights = fixture
    loss_mat = token_losses(name, logp, old, adv, mask).policy
    return agg_loss(loss_mat if weights is None else loss_mat * weights, mask, agg)


@pytest.mark.parametrize(
    "mode,adv,is_level,bad,verl_name",
    [
        ("mhpo.gspo", "token", None, "advantages", "gspo"),
        ("mhpo.gspo", "sequence", "token", "rollout_is_weights", "gspo"),
        ("mhpo.gmpo", "token", None, "advantages", "geo_mean"),
    ],
)
def test_sequence_objectives_refuse_inputs_where_they_would_differ_from_verl(mode, adv, is_level, bad, verl_name):
    """Where mhpo's gspo / gmpo and verl's gspo / geo_mean differ, the plug-in raises, naming the input
    and the loss mode to use; the difference it prevents is measured here on the same fixture."""
    fixture = verl_fixture(0, adv=adv, is_level=is_level)
    agg = "seq-mean-token-mean"
    clip = GSPO_CLIP if verl_name == "gspo" else GMPO_CLIP
    v_loss, v_grad, _ = run_loss(verl_name, fixture, agg, clip)
    before = unguarded(mode.removeprefix("mhpo."), fixture, agg)
    diff = float((grad(before, fixture) - v_grad).abs().max()) + abs(val(before - v_loss))
    assert diff > 1e-2
    with pytest.raises(ValueError, match=rf"^loss_mode={mode}: {bad} vary within a sequence.*; use "):
        run_loss(mode, fixture, agg, {}, mhpo_cfg(mode))


@pytest.mark.parametrize("is_level", [None, "token", "sequence"])
def test_gmpo_equals_geo_mean_with_rollout_is_weights(is_level):
    """verl's geo_mean weights each sequence by the geometric mean of its tokens' IS weights; so does ours."""
    for seed in range(5):
        fixture = verl_fixture(seed, adv="sequence", is_level=is_level, ragged=True)  # bool mask: no 1e-8 offset
        v_loss, v_grad, _ = run_loss("geo_mean", fixture, "token-mean", GMPO_CLIP)
        o_loss, o_grad, _ = run_loss("mhpo.gmpo", fixture, "seq-mean-token-mean", {}, mhpo_cfg("mhpo.gmpo"))
        torch.testing.assert_close(o_loss, v_loss, **TIGHT)
        torch.testing.assert_close(o_grad, v_grad, **TIGHT)
    # verl's float all-ones mask: its lengths + 1e-8 (a float mask keeps the 1e-8) leave ~1e-9 per term
    fixture = verl_fixture(7, adv="sequence", is_level=is_level)
    v_loss, v_grad, _ = run_loss("geo_mean", fixture, "token-mean", GMPO_CLIP)
    o_loss, o_grad, _ = run_loss("mhpo.gmpo", fixture, "seq-mean-token-mean", {}, mhpo_cfg("mhpo.gmpo"))
    torch.testing.assert_close(o_loss, v_loss, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(o_grad, v_grad, rtol=1e-6, atol=1e-9)


# -- metrics under verl's names mean verl's things --------------------------------------------------------

# (our loss mode, our hparams, verl's loss, verl's clip settings, advantages)
METRIC_PAIRS = {
    "grpo+dual": ("mhpo.grpo", {"dual_clip": 3.0}, "vanilla", PPO_CLIP, "token"),
    "dapo+dual": ("mhpo.dapo", {"dual_clip": 3.0}, "vanilla", dict(clip_ratio_low=0.2, clip_ratio_high=0.28), "token"),
    "gspo": ("mhpo.gspo", {}, "gspo", GSPO_CLIP, "sequence"),
    "gspo-token": ("mhpo.gspo-token", {}, "gspo", GSPO_CLIP, "token"),
    "sapo": ("mhpo.sapo", {}, "sapo", dict(tau_pos=1.0, tau_neg=1.05), "token"),
    "cispo": ("mhpo.cispo", {"cap": 1.2, "floor": 0.8}, "cispo", PPO_CLIP, "token"),
    "gmpo": ("mhpo.gmpo", {}, "geo_mean", GMPO_CLIP, "sequence"),
}
VERL_KEYS = ("actor/ppo_kl", "actor/pg_clipfrac", "actor/pg_clipfrac_lower")


def with_far_tokens(fixture, seed: int):
    """A few tokens at |log r| = 25 (beyond verl's +-20 clamp) and at r = 4 (dual clip), the rest as given."""
    logp, old, adv, mask, weights = fixture
    g = torch.Generator().manual_seed(seed)
    pick = torch.rand(old.shape, generator=g, dtype=old.dtype)
    log_r = logp.detach() - old
    log_r = torch.where(pick < 0.05, 25.0, torch.where(pick < 0.1, -25.0, torch.where(pick < 0.2, 1.386, log_r)))
    return (old + log_r).requires_grad_(True), old, adv, mask, weights


@pytest.mark.parametrize("case", sorted(METRIC_PAIRS))
def test_verl_metric_keys_equal_verls_own_metrics(case):
    mode, hp, builtin_name, clip, adv = METRIC_PAIRS[case]
    seen = {key: 0.0 for key in VERL_KEYS}
    for seed in range(6):
        fixture = verl_fixture(seed, adv=adv, is_level=None, ragged=seed % 2 == 1)
        fixture = with_far_tokens(fixture, seed) if seed >= 3 else fixture
        _, _, theirs = run_loss(builtin_name, fixture, "token-mean", clip)
        _, _, ours = run_loss(mode, fixture, "token-mean", {}, mhpo_cfg(mode, **hp))
        for key in VERL_KEYS:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), (key, seed)
            seen[key] = max(seen[key], abs(theirs[key]))
        # mhpo's generalised clip fraction keeps its own name
        assert "actor/objective/clip_frac" in ours
    assert seen["actor/ppo_kl"] > 0
    if builtin_name != "sapo":
        assert seen["actor/pg_clipfrac"] > 0  # the comparison has teeth
    if case in ("grpo+dual", "dapo+dual", "gmpo"):
        assert seen["actor/pg_clipfrac_lower"] > 0


def test_objectives_without_a_verl_counterpart_report_no_verl_clip_fractions():
    fixture = verl_fixture(0, adv="sequence", is_level=None)
    logp, old, _, mask, _ = fixture
    for mode in ("mhpo", "mhpo.reinforce"):
        _, _, ours = run_loss(mode, fixture, "token-mean", {}, mhpo_cfg(mode))
        assert "actor/pg_clipfrac" not in ours and "actor/pg_clipfrac_lower" not in ours
        assert ours["actor/ppo_kl"] == pytest.approx(float(-(logp - old).detach()[mask.bool()].mean()))
        assert "actor/objective/clip_frac" in ours
