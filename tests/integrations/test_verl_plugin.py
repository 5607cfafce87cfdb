"""The verl plug-in: registration by `import verl`, equality with `mhpo.policy_loss`, global batch info."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed: pip install 'mhpo[verl]' (scripts/setup.sh --dev)")

from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn
from verl.workers.config import ActorConfig

import verl  # noqa: F401  (loads the verl.plugins entry points, ours included)
from mhpo import AGG_MODES, OBJECTIVES, policy_loss
from mhpo.integrations import verl as plugin
from mhpo.integrations.verl import LOSS_MODES, MHPOPolicyLossConfig

# A fresh interpreter: does a plain `import verl` register our losses, and do they compute policy_loss?
_PROBE = r"""
import json, sys, torch
import verl
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn
out = {"modes": sorted(k for k in POLICY_LOSS_REGISTRY if k.startswith("mhpo")),
       "plugin_imported": "mhpo.integrations.verl" in sys.modules}
if "mhpo" in POLICY_LOSS_REGISTRY:
    from mhpo import policy_loss
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 5, generator=g, dtype=torch.float64)
    logp = old + (torch.rand(4, 5, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.randn(4, 1, generator=g, dtype=torch.float64).expand(4, 5)
    mask = torch.ones(4, 5, dtype=torch.bool)
    ours, _ = get_policy_loss_fn("mhpo")(old, logp, adv, mask, "token-mean", None)
    ref, _ = policy_loss("mhpo", logp, old, adv, mask)
    out["abs_diff"] = abs(float(ours) - float(ref))
print("PROBE" + json.dumps(out))
"""


def _probe(env_overrides: dict[str, str | None]) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("VERL_USE_EXTERNAL_MODULES", None)
    env.pop("VERL_USE_EXTERNAL_PLUGINS", None)
    for key, value in env_overrides.items():
        if value is not None:
            env[key] = value
    return subprocess.Popen(
        [sys.executable, "-c", _PROBE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _result(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    line = next(ln for ln in stdout.splitlines() if ln.startswith("PROBE"))
    return json.loads(line[len("PROBE") :])


def test_import_verl_registers_through_the_entry_point_and_the_env_fallback():
    # three fresh interpreters, run side by side
    procs = {
        "entry_point": _probe({}),
        "plugins_off": _probe({"VERL_USE_EXTERNAL_PLUGINS": "none"}),
        "env_fallback": _probe(
            {"VERL_USE_EXTERNAL_PLUGINS": "none", "VERL_USE_EXTERNAL_MODULES": "mhpo.integrations.verl"}
        ),
    }
    results = {name: _result(proc) for name, proc in procs.items()}
    expected = sorted(LOSS_MODES)
    # plain `import verl`: the verl.plugins entry point loaded us, and the loss is policy_loss's
    assert results["entry_point"]["modes"] == expected
    assert results["entry_point"]["plugin_imported"]
    assert results["entry_point"]["abs_diff"] < 1e-12
    # control: with entry points disabled nothing registers them ...
    assert results["plugins_off"]["modes"] == []
    assert not results["plugins_off"]["plugin_imported"]
    # ... and VERL_USE_EXTERNAL_MODULES is the documented fallback
    assert results["env_fallback"]["modes"] == expected
    assert results["env_fallback"]["abs_diff"] < 1e-12


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="verl.plugins")}
    assert eps.get("mhpo") == "mhpo.integrations.verl"


def test_loss_modes_cover_every_objective_and_avoid_verl_names():
    assert LOSS_MODES["mhpo"] == "mhpo"
    assert {LOSS_MODES[f"mhpo.{name}"] for name in OBJECTIVES} == set(OBJECTIVES)
    for mode in LOSS_MODES:
        assert getattr(POLICY_LOSS_REGISTRY[mode], "mhpo_objective", None) == LOSS_MODES[mode]
    # verl's own losses are still verl's
    for builtin in ("vanilla", "gspo", "sapo", "cispo", "geo_mean"):
        assert getattr(POLICY_LOSS_REGISTRY[builtin], "mhpo_objective", None) is None


def actor_config(mode: str, agg: str, **policy_loss_fields) -> ActorConfig:
    return ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        loss_agg_mode=agg,
        policy_loss=MHPOPolicyLossConfig(loss_mode=mode, **policy_loss_fields),
    )


def _grad(loss: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, logp)
    return g


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", sorted(LOSS_MODES))
def test_verl_loss_equals_policy_loss_on_a_full_batch(mode, agg, batch_factory):
    logp, old, adv, mask = batch_factory(1, empty_row=True)
    cfg = actor_config(mode, agg)
    ours, metrics = get_policy_loss_fn(mode)(
        old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode=agg, config=cfg
    )
    ref, stats = policy_loss(LOSS_MODES[mode], logp, old, adv, mask, agg=agg)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_grad(ours, logp), _grad(ref, logp), rtol=1e-10, atol=1e-14)
    assert metrics["actor/objective/ratio/mean"] == pytest.approx(stats["ratio/mean"])
    assert metrics["actor/objective/clip_frac"] == stats["clip_frac"]  # mhpo's generalised measure, own name
    # verl's keys only where verl has a loss of that name (their values: test_verl_builtins.py)
    assert ("actor/pg_clipfrac" in metrics) == (LOSS_MODES[mode] in plugin.VERL_CLIP)
    log_r = (logp - old).detach()[mask]
    assert metrics["actor/ppo_kl"] == pytest.approx(float(-log_r.mean()))


def _split(n: int, parts: int) -> list[slice]:
    step = n // parts
    return [slice(i * step, (i + 1) * step) for i in range(parts)]


@pytest.mark.parametrize("dp_size", [1, 2])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", ["mhpo", "mhpo.grpo", "mhpo.gspo", "mhpo.gmpo", "mhpo.sapo"])
def test_micro_batches_with_global_batch_info_sum_to_the_full_batch(mode, agg, dp_size, batch_factory):
    """k micro-batches per rank, dp ranks averaged (DDP): loss and gradient of the whole mini-batch.

    Each micro-batch's verl loss is also exactly dp_size * policy_loss(micro, global counts).
    """
    B, T = 8, 7
    logp, old, adv, mask = batch_factory(2, B, T, empty_row=True)
    counts = {"num_tokens": int(mask.sum()), "num_seqs": B}  # verl's global_batch_size counts every row
    full, _ = policy_loss(LOSS_MODES[mode], logp, old, adv, mask, agg=agg, **counts)
    cfg = actor_config(mode, agg)
    fn = get_policy_loss_fn(mode)

    total_loss, total_grad = 0.0, torch.zeros_like(logp)
    for rank in _split(B, dp_size):
        rows = torch.arange(B)[rank]
        for micro in _split(len(rows), 2):
            idx = rows[micro]
            cfg.global_batch_info.update(
                dp_size=dp_size, batch_num_tokens=counts["num_tokens"], global_batch_size=B, loss_scale_factor=None
            )
            loss, _ = fn(
                old_log_prob=old[idx],
                log_prob=logp[idx],
                advantages=adv[idx],
                response_mask=mask[idx],
                loss_agg_mode=agg,
                config=cfg,
            )
            same, _ = policy_loss(LOSS_MODES[mode], logp[idx], old[idx], adv[idx], mask[idx], agg=agg, **counts)
            torch.testing.assert_close(loss, dp_size * same, rtol=1e-12, atol=1e-14)
            total_loss = total_loss + loss.detach() / dp_size  # DDP averages over ranks
            total_grad += _grad(loss, logp) / dp_size
    torch.testing.assert_close(total_loss, full.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(total_grad, _grad(full, logp), rtol=1e-10, atol=1e-14)


def test_without_global_batch_info_micro_batches_overcount(batch_factory):
    """Why the loss must pass **config.global_batch_info: local normalisation multiplies the
    gradient by the micro-batch count (seq-mean-token-mean, equal micro-batches)."""
    logp, old, adv, mask = batch_factory(3, 8, 7)
    full, _ = policy_loss("mhpo", logp, old, adv, mask, agg="seq-mean-token-mean")
    cfg = actor_config("mhpo", "seq-mean-token-mean")  # global_batch_info left empty
    fn = get_policy_loss_fn("mhpo")
    summed = sum(fn(old[s], logp[s], adv[s], mask[s], "seq-mean-token-mean", cfg)[0].detach() for s in _split(8, 4))
    torch.testing.assert_close(summed, 4 * full.detach(), rtol=1e-12, atol=1e-14)


def test_rollout_is_weights_scale_the_per_token_loss(batch_factory):
    logp, old, adv, mask = batch_factory(4)
    cfg = actor_config("mhpo", "token-mean")
    fn = get_policy_loss_fn("mhpo")
    base, _ = fn(old, logp, adv, mask, "token-mean", cfg)
    doubled, _ = fn(old, logp, adv, mask, "token-mean", cfg, torch.full_like(old, 2.0))
    torch.testing.assert_close(doubled, 2 * base, rtol=1e-12, atol=1e-14)
    # a zero weight on row 0 removes exactly row 0's terms (normaliser unchanged)
    w = torch.ones_like(old)
    w[0] = 0.0
    cfg.global_batch_info.update(batch_num_tokens=int(mask.sum()))
    dropped, _ = fn(old, logp, adv, mask, "token-mean", cfg, w)
    rest, _ = policy_loss("mhpo", logp[1:], old[1:], adv[1:], mask[1:], num_tokens=int(mask.sum()))
    torch.testing.assert_close(dropped, rest, rtol=1e-12, atol=1e-14)


def test_register_refuses_to_replace_a_foreign_loss(monkeypatch):
    monkeypatch.setitem(POLICY_LOSS_REGISTRY, "mhpo.grpo", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="'mhpo.grpo'"):
        plugin.register()


def test_policy_loss_config_validates_hparams():
    cfg = MHPOPolicyLossConfig(loss_mode="mhpo", mhpo_c=0.7, mhpo_hparams={"k_neg": 3.0})
    assert plugin.objective_hparams(cfg, "mhpo")["c"] == 0.7
    assert plugin.objective_hparams(cfg, "mhpo")["k_neg"] == 3.0
    with pytest.raises(ValueError, match=r"c=-1"):
        MHPOPolicyLossConfig(loss_mode="mhpo", mhpo_c=-1.0)
    with pytest.raises(ValueError, match=r"unknown hparam 'c'.*valid hparams: eps_low, eps_high"):
        MHPOPolicyLossConfig(loss_mode="mhpo.gspo", mhpo_c=1.0)
    with pytest.raises(ValueError, match=r"'vanilla' is not an mhpo loss.*mhpo_c"):
        MHPOPolicyLossConfig(loss_mode="vanilla", mhpo_c=1.0)
    with pytest.raises(ValueError, match=r"'c' is set twice"):
        MHPOPolicyLossConfig(loss_mode="mhpo", mhpo_c=1.0, mhpo_hparams={"c": 2.0})
    with pytest.raises(ValueError, match=r"unknown hparam 'eps_hi' \(did you mean 'eps_high'\?\)"):
        MHPOPolicyLossConfig(loss_mode="mhpo.dapo", mhpo_hparams={"eps_hi": 0.3})
    # a plain verl PolicyLossConfig (no _target_ override) gives the objective's defaults
    from verl.workers.config import PolicyLossConfig

    assert plugin.objective_hparams(PolicyLossConfig(loss_mode="mhpo"), "mhpo") == OBJECTIVES["mhpo"].defaults
