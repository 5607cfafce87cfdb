"""`mhpo train --engine trl` (mhpo.engines.trl): the config -> TRL mapping, the settings that do
not carry over, and a real 2-process CPU run under torchrun (gloo) with the built-in tiny model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="TRL is not installed: pip install 'mhpo[trl]' (scripts/setup.sh --dev)")

from mhpo.engines.trl import check_carries, mhpo_metrics, rl_examples, trl_args
from mhpo.errors import UsageError
from mhpo.integrations.trl import MHPOConfig
from mhpo.seeding import derive_seed
from mhpo.tasks import build_task
from mhpo.trainer.config import load_config

REPO = Path(__file__).resolve().parents[2]

# Every carried key away from its default (R = 4 x 6 = 24 rows: 3 minibatches of 8, 4 rows per process
# on 2 processes, micro-batches of 2).
CARRIED = [
    "seed=7",
    "model.dtype=float32",
    "model.device=cpu",
    "objective.name=dapo",
    "objective.hparams={eps_high: 0.28}",
    "objective.agg=seq-mean-token-mean",
    "objective.beta=0.04",
    "advantage.estimator=dr_grpo",
    "rewards.functions=[exact_match,last_number]",
    "rewards.weights=[1.0,0.25]",
    "rollout.prompts_per_step=4",
    "rollout.group_size=6",
    "rollout.max_new_tokens=12",
    "rollout.temperature=0.7",
    "rollout.top_p=0.9",
    "rollout.top_k=20",
    "update.num_minibatches=3",
    "update.epochs=2",
    "update.micro_batch_size=2",
    "update.max_grad_norm=0.5",
    "optim.lr=3e-5",
    "optim.weight_decay=0.01",
    "optim.beta1=0.8",
    "optim.beta2=0.95",
    "optim.eps=1e-6",
    "optim.warmup_steps=2",
    "optim.schedule=cosine",
    "optim.min_lr_ratio=0.1",
    "train.steps=5",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=3",
    "train.save_optimizer=false",
    "train.report_to=[tensorboard]",
    "train.progress=false",
]


def test_every_carried_key_lands_in_its_trl_field(tmp_path):
    cfg = load_config(None, CARRIED)
    args = trl_args(cfg, tmp_path, num_processes=2)
    per_step = 3 * 2  # num_minibatches x epochs optimizer steps per RL step
    expected = {
        "output_dir": str(tmp_path),
        "seed": 7,
        "use_cpu": True,
        "bf16": False,
        "ddp_backend": "gloo",
        "objective": "dapo",
        "objective_hparams": {"eps_high": 0.28},
        "loss_agg_mode": "seq-mean-token-mean",
        "beta": 0.04,
        "scale_rewards": "none",
        "reward_weights": [1.0, 0.25],
        "num_generations": 6,
        "max_completion_length": 12,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,  # 24 rows / 3 minibatches / 2 processes / micro 2
        "steps_per_generation": 6,  # 3 minibatches x 2 micro-batches
        "num_iterations": 2,
        "max_steps": 5 * per_step,
        "shuffle_dataset": False,
        "learning_rate": 3e-5,
        "optim": "adamw_torch",
        "weight_decay": 0.01,
        "adam_beta1": 0.8,
        "adam_beta2": 0.95,
        "adam_epsilon": 1e-6,
        "max_grad_norm": 0.5,
        "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
        "warmup_steps": 2 * per_step,
        "logging_steps": per_step,
        "save_strategy": "steps",
        "save_steps": 2 * per_step,
        "save_total_limit": 3,
        "save_only_model": True,
        "report_to": ["tensorboard"],
        "disable_tqdm": True,
    }
    assert {k: args[k] for k in expected} == expected
    # one generation batch = one RL step's rows, and num_minibatches x epochs optimizer steps per batch
    rows = 4 * 6
    assert args["per_device_train_batch_size"] * 2 * args["steps_per_generation"] == rows
    assert args["steps_per_generation"] // args["gradient_accumulation_steps"] * args["num_iterations"] == per_step


def test_the_mapping_builds_an_mhpo_config_whose_generation_batch_is_one_rl_step(tmp_path):
    cfg = load_config(None, [*CARRIED, "train.report_to=[]"])
    args = MHPOConfig(**trl_args(cfg, tmp_path, num_processes=1))  # this process is the only one
    assert args.generation_batch_size == 4 * 6
    assert args.resolved_loss() == (
        "dapo",
        "seq-mean-token-mean",
        {"eps_low": 0.2, "eps_high": 0.28, "dual_clip": None},
    )
    assert args.scale_rewards == "none" and args.num_iterations == 2 and args.max_steps == 30


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.schedule=constant"], {"lr_scheduler_type": "constant", "warmup_steps": 0}),
        (["optim.schedule=constant", "optim.warmup_steps=3"], {"lr_scheduler_type": "constant_with_warmup"}),
        (["optim.schedule=linear"], {"lr_scheduler_type": "linear"}),
        (
            ["optim.schedule=linear", "optim.min_lr_ratio=0.2", "optim.warmup_steps=1"],
            {
                "lr_scheduler_type": "warmup_stable_decay",
                "warmup_steps": 2,
                "lr_scheduler_kwargs": {"num_decay_steps": 18, "decay_type": "linear", "min_lr_ratio": 0.2},
            },
        ),
    ],
)
def test_lr_schedules(tmp_path, overrides, expected):
    base = ["train.steps=10", "update.num_minibatches=2", "rollout.prompts_per_step=2", "rollout.group_size=4"]
    args = trl_args(load_config(None, base + overrides), tmp_path, num_processes=1)
    assert {k: args[k] for k in expected} == expected


def test_unset_values_are_resolved_as_mhpo_train_resolves_them(tmp_path):
    args = trl_args(load_config(None, ["model.device=cpu"]), tmp_path, num_processes=1)
    assert args["learning_rate"] == 2e-4  # the built-in tiny model's default lr
    assert args["max_completion_length"] == build_task(load_config().task).max_new_tokens
    assert args["scale_rewards"] == "group" and args["objective"] == "mhpo" and args["beta"] == 0.0


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["rollout.staleness=2"], "rollout.staleness"),
        (["rollout.behaviour_logprobs=sampler"], "rollout.behaviour_logprobs"),
        (["rollout.precision=bf16"], "rollout.precision"),
        (["advantage.eps=1e-3"], "advantage.eps"),
        (["advantage.drop_zero_std=true"], "advantage.drop_zero_std"),
        (["objective.log_kl=true"], "objective.log_kl"),
        (["model.name_or_path=tiny-vlm"], "model.name_or_path"),
        (["train.steps=0"], "train.steps"),
        (["update.micro_batch_tokens=512"], "update.micro_batch_tokens"),
        (["update.minibatch_order=groups"], "update.minibatch_order"),
        (["rollout.prompts_per_step=3", "rollout.group_size=2", "update.num_minibatches=4"], "update.num_minibatches"),
        (["rollout.prompts_per_step=3", "rollout.group_size=2", "update.num_minibatches=2"], "update.num_minibatches"),
        (
            ["rollout.prompts_per_step=2", "rollout.group_size=4", "update.micro_batch_size=3"],
            "update.micro_batch_size",
        ),
    ],
)
def test_a_setting_that_does_not_carry_over_names_its_key(tmp_path, overrides, key):
    cfg = load_config(None, overrides)
    with pytest.raises(UsageError, match=rf"--engine trl: {key}=.*; valid: "):
        check_carries(cfg, num_processes=2)
    with pytest.raises(UsageError, match=key):
        trl_args(cfg, tmp_path, num_processes=2)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["rollout.staleness=2"], "--engine trl: rollout.staleness=2 does not carry over"),
        (["--resume", "somewhere"], "--engine trl runs are not resumable"),
    ],
)
def test_the_cli_rejects_with_one_line_before_any_work(capsys, tmp_path, argv, fragment):
    from mhpo.cli import main

    out = tmp_path / "run"
    extra = [] if "--resume" in argv else ["--output-dir", str(out)]
    assert main(["train", "--engine", "trl", *argv, *extra]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_the_defaults_carry_over():
    check_carries(load_config(), num_processes=2)  # 32 x 8 rows, 2 minibatches, 2 processes


def test_trl_metric_names_become_mhpo_names():
    logs = {
        "reward": 0.5,
        "reward_std": 0.1,
        "rewards/exact_match/mean": 0.25,
        "rewards/exact_match/std": 0.3,
        "loss": 0.01,
        "grad_norm": 2.0,
        "learning_rate": 1e-5,
        "objective/clip_frac": 0.1,
        "objective/mhpo/psi_mean": 0.2,
        "kl": 0.03,
        "completions/clipped_ratio": 0.5,
        "frac_reward_zero_std": float("nan"),
        "num_tokens": 10.0,
    }
    assert mhpo_metrics(logs) == {
        "reward/mean": 0.5,
        "reward/std": 0.1,
        "reward/exact_match": 0.25,
        "rewards/exact_match/std": 0.3,
        "policy/loss": 0.01,
        "grad_norm": 2.0,
        "lr": 1e-5,
        "policy/clip_frac": 0.1,
        "policy/mhpo/psi_mean": 0.2,
        "policy/kl": 0.03,
        "response/truncated_frac": 0.5,
        "groups/zero_std_frac": None,
        "num_tokens": 10.0,
    }


def test_rl_examples_are_the_trainers_prompts_in_its_order():
    cfg = load_config(None, ["train.steps=3", "rollout.prompts_per_step=5", "eval.size=10"])
    task = build_task(cfg.task)
    heldout = task.heldout(10, cfg.eval.seed)
    rows = rl_examples(cfg, task, heldout)
    source = task.train_source(derive_seed(cfg.seed, "rl-data"), frozenset(ex.key for ex in heldout))
    per_step = [source.next(5) for _ in range(3)]  # what mhpo train draws, one call per RL step
    assert [ex.key for ex in rows] == [ex.key for step in per_step for ex in step]


# -- a real 2-process run ------------------------------------------------------------------------------------

REWARD = '''
import json, os
from pathlib import Path


def spread(prompts, completions, completion_ids=None, **kwargs):
    """Rewards with spread inside a group; records the prompts of each training batch (the TRL path
    passes completion_ids, mhpo's held-out evaluation does not)."""
    if completion_ids is not None:
        with open(Path(__file__).with_name(f"seen-{os.getpid()}.jsonl"), "a") as fh:
            fh.write(json.dumps(prompts) + "\\n")
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(sum(map(ord, t)) % 10) / 10 for t in texts]
'''

STEPS, PROMPTS, GROUP = 3, 2, 4


def test_two_process_torchrun_run(tmp_path):
    """torchrun --nproc_per_node 2 -m mhpo.cli train --engine trl: 3 RL steps on CPU (gloo)."""
    (tmp_path / "reward.py").write_text(textwrap.dedent(REWARD))
    run_dir = tmp_path / "run"
    overrides = [
        "warmup.enabled=off",
        "eval.size=4",
        "eval.pass_k=0",
        f"rollout.prompts_per_step={PROMPTS}",
        f"rollout.group_size={GROUP}",
        "update.num_minibatches=2",
        "train.progress=false",
        "train.report_to=[]",
        "train.plots=false",
        f"rewards.functions=[{tmp_path / 'reward.py'}:spread,auto]",
        "rewards.weights=[1.0,0.5]",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "mhpo.cli",
        "train",
        "--engine",
        "trl",
        "--output-dir",
        str(run_dir),
        "--steps",
        str(STEPS),
        *overrides,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("mhpo train: mhpo on addition") == 1  # only process 0 prints the summary

    # metrics.jsonl: one line per RL step, finite reward and loss, MHPO's diagnostics
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))
    assert [r["optimizer_step"] for r in lines] == [2 * s for s in range(1, STEPS + 1)]  # 2 minibatches per step
    for r in lines:
        for key in ("reward/mean", "policy/loss", "grad_norm", "lr", "reward/spread", "reward/exact_match"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r)
        assert r["reward/mean"] == pytest.approx(r["reward/spread"] + 0.5 * r["reward/exact_match"], abs=1e-6)
        for key in ("policy/multiplier/mean", "policy/mhpo/psi_mean", "policy/clip_frac", "policy/ratio/max"):
            assert key in r, key
        assert r["policy/ratio/max"] > 1.0  # the second minibatch is off-policy: ratio control has work
        assert 0.0 <= r["accuracy"] <= 1.0 and r["reward/errors"] == 0.0

    # summary.json: written once, by process 0; the weights are the same on both processes, and trained
    summary = json.loads((run_dir / "summary.json").read_text())
    assert out.count("weights on the 2 process(es) identical") == 1
    assert summary["engine"] == "trl" and summary["steps"] == STEPS and summary["complete"] is True
    trl = summary["trl"]
    assert trl["num_processes"] == 2 and trl["optimizer_steps"] == 2 * STEPS
    assert len(trl["weights_fingerprints"]) == 2 and trl["weights_in_sync"] is True
    assert len(set(trl["weights_fingerprints"])) == 1
    assert not list(run_dir.glob(".summary.json.tmp*"))
    evals = [json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines()]
    assert [(e["step"], e["stage"]) for e in evals] == [(0, "before"), (STEPS, "after")]
    assert summary["accuracy_before_rl"] == evals[0]["greedy/accuracy"]
    _assert_trained(run_dir, Path(summary["checkpoint"]))

    # the prompts of RL step s are the mhpo trainer's rows [(s-1) P, s P), split over the two processes
    seen = [f.read_text().splitlines() for f in sorted(tmp_path.glob("seen-*.jsonl"))]
    assert len(seen) == 2 and all(len(s) == STEPS for s in seen)
    cfg = load_config(run_dir / "config.yaml")
    task = build_task(cfg.task)
    expected = [ex.prompt for ex in rl_examples(cfg, task, task.heldout(cfg.eval.size, cfg.eval.seed))]
    for step in range(STEPS):
        prompts = json.loads(seen[0][step]) + json.loads(seen[1][step])
        assert sorted(prompts) == sorted(expected[step * PROMPTS : (step + 1) * PROMPTS] * GROUP)


def _assert_trained(run_dir: Path, checkpoint: Path) -> None:
    """The final checkpoint is the tiny model of the run's seed, moved by training."""
    import torch
    from safetensors.torch import load_file

    from mhpo.models.tiny import build_tiny

    cfg = load_config(run_dir / "config.yaml")
    assert checkpoint.parent == run_dir / "checkpoints"
    initial, _ = build_tiny(cfg.model.tiny, derive_seed(cfg.seed, "init"))
    saved = load_file(str(checkpoint / "model.safetensors"))
    moved = max(
        float((saved[name] - p.detach()).abs().max()) for name, p in initial.named_parameters() if name in saved
    )
    assert moved > 1e-5
    assert all(torch.isfinite(t).all() for t in saved.values())
