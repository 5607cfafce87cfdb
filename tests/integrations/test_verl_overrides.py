"""`mhpo verl-overrides`: the printed overrides compose with verl 0.9.1's ppo_trainer, and the actor
verl builds from them computes mhpo's loss with the config's objective, hyper-parameters and shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed: pip install 'mhpo[verl]' (scripts/setup.sh --dev)")

from hydra import compose, initialize_config_dir
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.utils.config import omega_conf_to_dataclass

import verl
from mhpo import policy_loss
from mhpo.cli import main
from mhpo.engines.verl import hydra_value, verl_overrides
from mhpo.errors import UsageError
from mhpo.trainer.config import load_config

VERL_CONFIG = str(Path(verl.__file__).parent / "trainer" / "config")


def composed(overrides: list[str]):
    with initialize_config_dir(config_dir=VERL_CONFIG, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    return cfg, omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def test_the_overrides_reach_verls_config_and_loss(capsys, batch_factory):
    argv = [
        "verl-overrides",
        "--config",
        "smollm2-short-answers",
        "objective.name=dapo",
        "objective.hparams.eps_high=0.05",
    ]
    argv += ["objective.agg=seq-mean-token-mean", "objective.beta=0.02", "update.num_minibatches=4", "update.epochs=2"]
    argv += ["optim.lr=3e-6", "optim.warmup_steps=5", "advantage.estimator=dr_grpo", "rollout.top_k=20"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    overrides = out.splitlines()
    assert "note: model.name_or_path='smollm2-135m-instruct'" in err  # what is not carried over, on stderr
    cfg, actor = composed(overrides)
    assert actor.policy_loss.loss_mode == "mhpo.dapo" and actor.policy_loss.mhpo_hparams["eps_high"] == 0.05
    assert actor.loss_agg_mode == "seq-mean-token-mean"
    assert (actor.use_kl_loss, actor.kl_loss_coef, actor.kl_loss_type) == (True, 0.02, "low_var_kl")
    assert cfg.data.train_batch_size == 8 and cfg.actor_rollout_ref.rollout.n == 4
    assert (actor.ppo_mini_batch_size, actor.ppo_epochs) == (2, 2)  # 8 prompts / 4 mini-batches; verl x n later
    assert actor.optim.lr == 3e-6 and actor.optim.lr_warmup_steps == 5 * 4 * 2  # RL steps -> optimizer steps
    assert cfg.algorithm.norm_adv_by_std_in_grpo is False and cfg.actor_rollout_ref.rollout.top_k == 20
    assert cfg.trainer.total_training_steps == 12 and cfg.data.max_response_length == 16
    logp, old, adv, mask = batch_factory(5, spread=1.0)
    got = get_policy_loss_fn(actor.policy_loss.loss_mode)(old, logp, adv, mask, actor.loss_agg_mode, actor)[0]
    want, _ = policy_loss("dapo", logp, old, adv, mask, agg="seq-mean-token-mean", eps_high=0.05)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_the_default_mhpo_overrides_select_the_papers_defaults(batch_factory):
    overrides, notes = verl_overrides(load_config(None))
    _, actor = composed(overrides)
    assert actor.policy_loss.loss_mode == "mhpo.mhpo" and actor.policy_loss.mhpo_hparams == {}
    logp, old, adv, mask = batch_factory(6, spread=1.0)
    got = get_policy_loss_fn("mhpo.mhpo")(old, logp, adv, mask, actor.loss_agg_mode, actor)[0]
    torch.testing.assert_close(got, policy_loss("mhpo", logp, old, adv, mask)[0], rtol=1e-12, atol=1e-14)


def test_what_verl_cannot_hold_is_named():
    with pytest.raises(UsageError, match=r"prompts_per_step=6 is not divisible by update.num_minibatches=4"):
        verl_overrides(load_config(None, ["rollout.prompts_per_step=6", "update.num_minibatches=4"]))
    _, notes = verl_overrides(load_config(None, ["rollout.staleness=4", "optim.schedule=linear"]))
    assert any("rollout.staleness=4" in n for n in notes) and any("optim.schedule='linear'" in n for n in notes)


def test_a_token_budget_per_micro_batch_is_verls_dynamic_batch_size():
    overrides, notes = verl_overrides(load_config(None, ["update.micro_batch_tokens=3000"]))
    _, actor = composed(overrides)
    assert actor.use_dynamic_bsz is True and actor.ppo_max_token_len_per_gpu == 3000
    assert any("update.micro_batch_tokens=3000" in n and "every row's prompt" in n for n in notes)
    _, actor = composed(verl_overrides(load_config(None))[0])
    assert actor.use_dynamic_bsz is False  # unset: verl's default (rows per micro-batch)


def test_group_ordered_minibatches_are_a_note_for_verl():
    overrides, notes = verl_overrides(load_config(None, ["update.minibatch_order=groups"]))
    assert overrides == verl_overrides(load_config(None))[0]
    assert any(n.startswith("update.minibatch_order=groups is not carried over") for n in notes)
    assert not any("minibatch_order" in n for n in verl_overrides(load_config(None))[1])


def test_hydra_values():
    assert [hydra_value(v) for v in (1e-6, True, [0.9, 0.999], {"c": 1.5, "lfm": False}, 3)] == [
        "1e-06",
        "True",
        "[0.9,0.999]",
        "{c:1.5,lfm:False}",
        "3",
    ]
