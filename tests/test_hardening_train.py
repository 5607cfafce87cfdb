"""Hardening in the trainer: resume past a damaged checkpoint, `mhpo eval` naming one, optional
final checkpoints (train.final_checkpoint, train.save_optimizer) and a truthful summary."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from _train_helpers import small_config
from mhpo.errors import UsageError
from mhpo.trainer import checkpoint as ckpt
from mhpo.trainer.loop import run_training
from mhpo.trainer.progress import _plural, print_summary
from mhpo.trainer.run_dir import written_outputs

FAST = [
    "warmup.enabled=off",
    "eval.size=8",
    "eval.pass_k=0",
    "eval.every=0",
    "rollout.prompts_per_step=4",
    "train.report_to=[]",
]


def _run(tmp_path, name, *overrides, resume="never"):
    out = io.StringIO()
    summary = run_training(
        small_config(*FAST, *overrides), tmp_path / name, resume=resume, console=Console(file=out, width=200)
    )
    return summary, out.getvalue()


def test_resume_skips_a_damaged_checkpoint_and_eval_names_it(tmp_path):
    from mhpo.trainer.evaluate_run import evaluate_run

    summary, _ = _run(tmp_path, "a", "train.steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=3")
    root = tmp_path / "a" / "checkpoints"
    assert summary["checkpoint"] == str(root / "step_000002") and summary["checkpoints"] == [
        "step_000001",
        "step_000002",
    ]
    damaged = root / "step_000002" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-3])
    with pytest.raises(UsageError) as err:
        evaluate_run(tmp_path / "a")
    assert str(err.value) == (
        f"checkpoint {root / 'step_000002'} is damaged (model.safetensors: size "
        f"{damaged.stat().st_size} bytes, expected {damaged.stat().st_size + 3}); intact checkpoints: "
        "step_000001 (--checkpoint NAME)"
    )
    summary, log = _run(
        tmp_path, "a", "train.steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=3", resume="require"
    )
    assert f"warning: checkpoint {root / 'step_000002'} is damaged (model.safetensors: size" in log
    assert "resuming" in log and "from step 1 (step_000001)" in log
    assert summary["complete"] and summary["steps"] == 3
    assert all(ckpt.verify_checkpoint(root / n) is None for n in summary["checkpoints"])  # step 2 was rewritten


def test_final_checkpoint_model_none_and_no_optimizer(tmp_path):
    summary, _ = _run(tmp_path, "m", "train.steps=1", "train.checkpoint_every=0", "train.final_checkpoint=model")
    final = tmp_path / "m" / "checkpoints" / "step_000001"
    assert summary["checkpoint"] == str(final)
    names = {p.name for p in final.iterdir()}
    assert "model.safetensors" in names and not names & {"optimizer.safetensors", "rng.safetensors"}
    summary, _ = _run(tmp_path, "n", "train.steps=1", "train.checkpoint_every=0", "train.final_checkpoint=none")
    assert summary["checkpoint"] is None and summary["checkpoints"] == []
    assert not (tmp_path / "n" / "checkpoints").exists() or not any((tmp_path / "n" / "checkpoints").iterdir())
    assert written_outputs(summary) == ["metrics.jsonl", "evals.jsonl", "samples/", "summary.json"]
    summary, _ = _run(tmp_path, "o", "train.steps=1", "train.checkpoint_every=0", "train.save_optimizer=false")
    assert not (tmp_path / "o" / "checkpoints" / "step_000001" / "optimizer.safetensors").exists()
    out = io.StringIO()
    print_summary({**summary, "heldout_size": 1, "steps": 1}, file=out)
    text = out.getvalue()
    assert "after 1 RL step (1 problem)" in text and "tensorboard/" not in text and "plots/" not in text
    assert "(metrics.jsonl, evals.jsonl, samples/, checkpoints/, summary.json)" in text


def test_plural():
    assert (_plural(1, "problem"), _plural(2, "problem"), _plural(0, "RL step")) == (
        "1 problem",
        "2 problems",
        "0 RL steps",
    )
