"""Ctrl-C (SIGINT) during `mhpo train`: one line on stderr naming what was saved and the command that
continues, no traceback from any process, and a resume that reproduces the uninterrupted run exactly.

The signal is sent by the run to itself at a known moment (MHPO_FAULT=sigint@<point>:<step>):
before a step samples (the step is dropped, the previous one checkpointed) and once its update has
begun (the update finishes, the step is logged and checkpointed)."""

from __future__ import annotations

import subprocess
import sys

import torch
from safetensors.torch import load_file

from _train_helpers import ENV, SMALL, jsonl, mhpo_cli
from mhpo.trainer.metrics import strip_timing

STEPS = 6
# staleness 2: the batches sampled for later steps go back to the step's start too
ARGS = [*SMALL, "eval.every=0", "train.checkpoint_every=0", "train.report_to=[]", "rollout.staleness=2"]


def _train(run, cache, fault: str | None = None) -> subprocess.CompletedProcess:
    args = ["train", "--output-dir", str(run), "--steps", str(STEPS), "--seed", "1", *ARGS, f"warmup.cache_dir={cache}"]
    env = {**ENV, "MHPO_FAULT": fault} if fault else ENV
    return subprocess.run([sys.executable, "-m", "mhpo.cli", *args], env=env, capture_output=True, text=True)


def _weights(run):
    return load_file(str(run / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors"))


def _same_run(ref, run):
    a, b = jsonl(ref / "metrics.jsonl"), jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in b] == list(range(1, STEPS + 1))
    assert [strip_timing(m) for m in a] == [strip_timing(m) for m in b]
    wa, wb = _weights(ref), _weights(run)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ctrl_c_checkpoints_the_last_finished_step_and_the_resume_is_exact(tmp_path):
    cache = tmp_path / "warmup"
    ref = tmp_path / "ref"
    assert _train(ref, cache).returncode == 0

    for point, step, saved in (("step-start", 3, 2), ("update", 4, 4)):
        run = tmp_path / point
        stopped = _train(run, cache, f"sigint@{point}:{step}")
        assert stopped.returncode == 130, stopped.stderr
        assert stopped.stderr.strip().splitlines() == [
            f"mhpo train: stopped by SIGINT at RL step {saved + 1}/{STEPS}; checkpoint of step {saved} saved "
            f"({run}/checkpoints/step_{saved:06d}). Continue with: mhpo train --resume {run}"
        ]
        assert "Traceback" not in stopped.stdout
        assert [m["step"] for m in jsonl(run / "metrics.jsonl")] == list(range(1, saved + 1))
        done = mhpo_cli("train", "--resume", str(run))
        assert done.returncode == 0, done.stderr
        assert f"resuming {run} from step {saved}" in done.stdout
        _same_run(ref, run)


def test_ctrl_c_before_any_step_says_there_is_nothing_to_resume(tmp_path):
    run = tmp_path / "run"
    stopped = _train(run, tmp_path / "warmup", "sigint@step-start:1")
    assert stopped.returncode == 130
    assert stopped.stderr.strip().splitlines() == [
        "mhpo train: stopped by SIGINT at RL step 1/6; no RL step finished, nothing to resume "
        "(a --resume would start over)"
    ]
    again = mhpo_cli("train", "--resume", str(run), "--steps", "1")
    assert again.returncode == 0, again.stderr
    assert f"{run} has no complete checkpoint; starting it over from step 0" in again.stdout


def test_a_run_without_a_terminal_prints_one_line_per_step(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--output-dir", str(run), "--steps", "2", *SMALL, "train.progress=true", "eval.every=1"]
    done = subprocess.run([sys.executable, "-m", "mhpo.cli", *args], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 2
    assert lines[0].startswith("step 1/2  reward ") and lines[0].endswith(" s/step")
    assert "held-out" in lines[0] and "held-out" not in lines[1]  # step 2's evaluation is the one after RL
