"""Hyper-parameters through verl's own hydra config: `_target_` + `+key=value`, the example script
and the example config compose with verl 0.9.1's ppo_trainer and reach the loss."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed: pip install 'mhpo[verl]' (scripts/setup.sh --dev)")

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.utils.config import omega_conf_to_dataclass

import verl
from mhpo import policy_loss
from mhpo.integrations.verl import MHPOPolicyLossConfig

VERL_CONFIG = str(Path(verl.__file__).parent / "trainer" / "config")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "verl"
ACTOR = "actor_rollout_ref.actor"
TARGET = f"{ACTOR}.policy_loss._target_=mhpo.integrations.verl.MHPOPolicyLossConfig"
REQUIRED = [f"{ACTOR}.ppo_micro_batch_size_per_gpu=2", "actor_rollout_ref.rollout.n=4"]


def actor_from(overrides: list[str], config_dir: str = VERL_CONFIG, config_name: str = "ppo_trainer"):
    """verl's ppo_trainer composed with ``overrides`` and the actor config built the way verl's
    workers build it (omega_conf_to_dataclass -> hydra instantiate of the _target_ classes)."""
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(config_name=config_name, overrides=overrides)
    return cfg, omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def verl_loss(actor, batch):
    logp, old, adv, mask = batch
    mode = actor.policy_loss.loss_mode
    return get_policy_loss_fn(mode)(old, logp, adv, mask, actor.loss_agg_mode, actor)[0]


def test_target_override_carries_non_default_mhpo_hparams(batch_factory):
    _, actor = actor_from(
        REQUIRED
        + [
            f"{ACTOR}.policy_loss.loss_mode=mhpo",
            TARGET,
            f"+{ACTOR}.policy_loss.mhpo_c=0.7",
            f"+{ACTOR}.policy_loss.mhpo_k_neg=3.0",
            f"{ACTOR}.loss_agg_mode=seq-mean-token-mean",
        ]
    )
    assert isinstance(actor.policy_loss, MHPOPolicyLossConfig)
    assert (actor.policy_loss.mhpo_c, actor.policy_loss.mhpo_k_neg) == (0.7, 3.0)
    batch = batch_factory(20, spread=1.0)
    logp, old, adv, mask = batch
    got = verl_loss(actor, batch)
    want, _ = policy_loss("mhpo", logp, old, adv, mask, agg="seq-mean-token-mean", c=0.7, k_neg=3.0)
    default, _ = policy_loss("mhpo", logp, old, adv, mask, agg="seq-mean-token-mean")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert abs(float((got - default).detach())) > 1e-3  # the overrides really changed the loss


def test_generic_hparams_dict_reaches_any_objective(batch_factory):
    _, actor = actor_from(
        REQUIRED
        + [f"{ACTOR}.policy_loss.loss_mode=mhpo.dapo", TARGET, f"+{ACTOR}.policy_loss.mhpo_hparams={{eps_high:0.05}}"]
    )
    assert actor.policy_loss.mhpo_hparams == {"eps_high": 0.05}
    batch = batch_factory(21, spread=1.0)
    logp, old, adv, mask = batch
    want, _ = policy_loss("dapo", logp, old, adv, mask, eps_high=0.05)
    torch.testing.assert_close(verl_loss(actor, batch), want, rtol=1e-12, atol=1e-14)


def test_plain_overrides_fail_as_documented():
    # struct mode: a new key without "+" is rejected when the config is composed
    with pytest.raises(ConfigCompositionException, match="mhpo_c"):
        actor_from(REQUIRED + [TARGET, f"{ACTOR}.policy_loss.mhpo_c=0.7"])
    # "+" without the _target_ switch: verl's frozen PolicyLossConfig has no such field
    with pytest.raises(InstantiationException, match="mhpo_c"):
        actor_from(REQUIRED + [f"{ACTOR}.policy_loss.loss_mode=mhpo", f"+{ACTOR}.policy_loss.mhpo_c=0.7"])


def test_bad_hparam_is_rejected_when_verl_builds_the_config():
    with pytest.raises(InstantiationException, match=r"hparam c=-1 is out of range; it must be > 0"):
        actor_from(REQUIRED + [f"{ACTOR}.policy_loss.loss_mode=mhpo", TARGET, f"+{ACTOR}.policy_loss.mhpo_c=-1"])


def _script_overrides() -> list[str]:
    env = {**os.environ, "DRY_RUN": "1", "MODEL_PATH": "/models/Qwen2.5-7B-Instruct", "NNODES": "2"}
    out = subprocess.run(
        ["bash", str(EXAMPLES / "run_gsm8k_mhpo.sh")], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.splitlines()


def test_example_script_and_config_compose_with_verl_and_select_mhpo(batch_factory):
    script_cfg, script_actor = actor_from(_script_overrides())
    file_cfg, file_actor = actor_from(["actor_rollout_ref.model.path=/m"], str(EXAMPLES), "gsm8k_mhpo")
    for cfg, actor in ((script_cfg, script_actor), (file_cfg, file_actor)):
        assert cfg.algorithm.adv_estimator == "grpo"
        assert cfg.actor_rollout_ref.rollout.name == "vllm"
        assert actor.policy_loss.loss_mode == "mhpo"
        assert isinstance(actor.policy_loss, MHPOPolicyLossConfig)
        # several optimizer updates per rollout batch, so the ratio is not identically 1
        assert cfg.data.train_batch_size // actor.ppo_mini_batch_size >= 2
        assert cfg.actor_rollout_ref.rollout.n >= 2
    assert script_cfg.trainer.nnodes == 2
    assert script_cfg.actor_rollout_ref.model.path == "/models/Qwen2.5-7B-Instruct"
    # both spell out the paper defaults: the loss is MHPO's default loss
    batch = batch_factory(22, spread=1.0)
    logp, old, adv, mask = batch
    want, _ = policy_loss("mhpo", logp, old, adv, mask)
    for actor in (script_actor, file_actor):
        torch.testing.assert_close(verl_loss(actor, batch), want, rtol=1e-12, atol=1e-14)
