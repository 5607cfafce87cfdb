"""Kill-and-resume: a run killed while writing a checkpoint, and again by SIGKILL at an arbitrary
moment, resumes from its last complete checkpoint and reproduces the uninterrupted run's metrics
exactly (CPU), line by line, timing fields aside."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from _train_helpers import ENV, SMALL, jsonl, mhpo_cli
from mhpo.trainer.metrics import strip_timing

STEPS = 16
ARGS = [*SMALL, "train.checkpoint_every=4", "train.report_to=[tensorboard]", "objective.name=mhpo"]


def _start(run, cache, *extra, env=None):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mhpo.cli",
            "train",
            "--output-dir",
            str(run),
            "--steps",
            str(STEPS),
            "--seed",
            "3",
            *ARGS,
            f"warmup.cache_dir={cache}",
            *extra,
        ],
        env={**ENV, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _last_step(run) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return len(lines)


@pytest.mark.parametrize(
    "pipeline",
    [(), ("rollout.staleness=3", "rollout.behaviour_logprobs=sampler")],
    ids=["on-policy", "staleness-3-sampler-logprobs"],
)
def test_killed_runs_resume_to_the_uninterrupted_metrics(tmp_path, pipeline):
    """With staleness the checkpoints also carry the batches sampled for later steps."""
    cache = tmp_path / "warmup-cache"
    ref, run = tmp_path / "ref", tmp_path / "run"

    p = _start(ref, cache, *pipeline)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err

    # 1. die halfway through writing the step-8 checkpoint (model and optimizer written, no state)
    p = _start(run, cache, *pipeline, env={"MHPO_FAULT": "checkpoint:8"})
    _, err = p.communicate(timeout=600)
    assert p.returncode == 75, err
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000004"
    assert [d.name for d in ckpts.iterdir() if d.name.startswith(".tmp-step_000008")]  # the torn write
    assert not (ckpts / "step_000008").exists()
    assert _last_step(run) == 8

    # 2. resume, then SIGKILL it at whatever it is doing once it has logged step 10
    p = subprocess.Popen(
        [sys.executable, "-m", "mhpo.cli", "train", "--resume", str(run)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    while _last_step(run) < 10 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists()

    # 3. resume to the end
    done = mhpo_cli("train", "--resume", str(run), timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout

    a, b = jsonl(ref / "metrics.jsonl"), jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert strip_timing(x) == strip_timing(y), x["step"]
    if pipeline:  # the pipeline filled: from step 4 on each batch was sampled 3 RL steps earlier
        assert [m["staleness/policy_lag"] for m in b] == [0, 1, 2] + [3] * (STEPS - 3)
        assert (run / "checkpoints" / "step_000012" / "pending.safetensors").is_file()
    assert jsonl(ref / "evals.jsonl") == jsonl(run / "evals.jsonl")
    wa = load_file(str(ref / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors"))
    wb = load_file(str(run / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not [d for d in (run / "checkpoints").iterdir() if d.name.startswith(".")]

    # the TensorBoard log of the resumed run has one value per step (events after the checkpoint purged)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/reward/mean")]
    assert steps == list(range(1, STEPS + 1))

    # `mhpo eval DIR` evaluates the final checkpoint with the run's own held-out set
    ev = mhpo_cli("eval", str(run), "eval.pass_k=0", timeout=600)
    assert ev.returncode == 0, ev.stderr
    import json

    record = json.loads((run / "eval" / f"step_{STEPS:06d}.json").read_text())
    after = [e for e in jsonl(run / "evals.jsonl") if e["stage"] == "after"][0]
    assert record["results"]["greedy/accuracy"] == after["greedy/accuracy"]
    assert record["step"] == STEPS

    # extending a finished run continues from its final checkpoint
    more = mhpo_cli("train", "--resume", str(run), "--steps", str(STEPS + 2), timeout=600)
    assert more.returncode == 0, more.stderr
    assert [m["step"] for m in jsonl(run / "metrics.jsonl")][-3:] == [STEPS, STEPS + 1, STEPS + 2]
