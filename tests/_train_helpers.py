"""Shared helpers of the training tests: small configs and subprocess runs of `mhpo train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mhpo.trainer.config import load_config

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# A run small enough for tests: few prompts, a short capped warm-up, a small held-out set.
SMALL = [
    "rollout.prompts_per_step=8",
    "rollout.group_size=4",
    "eval.size=24",
    "eval.pass_k=2",
    "eval.every=4",
    "warmup.max_steps=30",
    "warmup.eval_every=10",
    "warmup.eval_size=16",
    "train.progress=false",
    "train.plots=false",
]


def small_config(*overrides: str):
    return load_config(None, [*SMALL, *overrides])


def mhpo_cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mhpo.cli", *args], env={**ENV, **(env or {})}, capture_output=True, text=True, **kw
    )


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
