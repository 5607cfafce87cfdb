"""Run logs: ``metrics.jsonl`` (one line per RL step) and ``evals.jsonl`` (one line per evaluation),
the source of truth, and the trackers of ``train.report_to`` (:mod:`mhpo.trainer.trackers`).

Lines are flushed as they are written, so a killed run leaves complete lines (at most one torn last
line, which readers skip). On resume, both files are cut back to the checkpoint's step and
TensorBoard purges events after it (wandb and trackio resume their run), so the logs of a resumed
run read like the uninterrupted run's.
Keys under ``time/`` and ``throughput/`` are wall-clock measurements; everything else is a pure
function of the config and seed on CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mhpo.files import atomic_write_text, read_jsonl

TIMING_PREFIXES = ("time/", "throughput/")


def truncate_jsonl(path: str | Path, max_step: int) -> None:
    """Keep only the records with ``step <= max_step`` (rewritten atomically)."""
    path = Path(path)
    if path.exists():
        keep = [r for r in read_jsonl(path) if r.get("step", 0) <= max_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def strip_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(TIMING_PREFIXES)}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLogger:
    """Writes the metrics and evaluations of one run directory, and passes them to its trackers."""

    def __init__(
        self, run_dir: str | Path, report_to=(), config: dict | None = None, *, resume_step: int | None = None
    ):
        from mhpo.trainer.trackers import open_trackers

        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.evals_path = self.run_dir / "evals.jsonl"
        if resume_step is not None:
            truncate_jsonl(self.metrics_path, resume_step)
            truncate_jsonl(self.evals_path, resume_step)
        self._metrics = open(self.metrics_path, "a", buffering=1)
        self._evals = open(self.evals_path, "a", buffering=1)
        self.trackers = open_trackers(report_to, self.run_dir, config or {}, resume_step)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        self._track(step, "train", metrics)

    def log_eval(self, step: int, stage: str, results: dict[str, float]) -> None:
        record = {"step": step, "stage": stage, **{k: _clean(v) for k, v in results.items()}}
        self._evals.write(json.dumps(record) + "\n")
        self._track(step, "eval", results)

    def _track(self, step: int, prefix: str, values: dict) -> None:
        from mhpo.trainer.trackers import finite_scalars

        scalars = {f"{prefix}/{k}": v for k, v in finite_scalars(values).items()}
        for tracker in self.trackers:
            tracker.log(step, scalars)

    def flush(self) -> None:
        self._metrics.flush()
        self._evals.flush()
        for tracker in self.trackers:
            getattr(tracker, "flush", lambda: None)()

    def close(self) -> None:
        self._metrics.close()
        self._evals.close()
        for tracker in self.trackers:
            tracker.close()
