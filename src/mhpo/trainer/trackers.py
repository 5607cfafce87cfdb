"""Experiment trackers: where a run's metrics go besides its own JSONL files.

``metrics.jsonl`` (one line per RL step) and ``evals.jsonl`` (one line per evaluation) are always
written, and they are the source of truth: reports, resume and tests read them. ``train.report_to``
lists the trackers that also get every number:

    tensorboard   event files under <run>/tensorboard/ (train/<key>, eval/<key>)
    wandb         Weights & Biases, files under <run>/wandb/; offline unless WANDB_MODE says
                  otherwise (``wandb sync <run>/wandb/offline-run-*`` uploads later);
                  project $WANDB_PROJECT or "mhpo"
    trackio       Hugging Face's local-first trackio (a SQLite database under $TRACKIO_DIR, shown
                  by ``trackio show``); project $TRACKIO_PROJECT or "mhpo"

A tracker is a small object with ``log(step, values)`` (values: flat ``name -> float``, already
prefixed ``train/`` or ``eval/``), ``close()`` and optionally ``flush()``, made by a factory registered with
``@tracker("name")``. A run resumed from a checkpoint continues the same tracker run: TensorBoard
purges the events after the checkpoint's step, and wandb and trackio resume the run they saved.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from mhpo.errors import did_you_mean


class Tracker(Protocol):
    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


# name -> factory(run_dir, config as a plain dict, resume_step or None) -> Tracker
TRACKERS: dict[str, Callable[..., Tracker]] = {}
EXTRAS = {"wandb": "wandb", "trackio": "trackio"}  # module each tracker needs (pip install NAME)


def tracker(name: str):
    """Decorator: register a tracker factory under ``name`` (a value of ``train.report_to``)."""

    def register(factory):
        TRACKERS[name] = factory
        return factory

    return register


def check_report_to(names) -> None:
    """ValueError naming the first unknown or uninstalled tracker of ``train.report_to``."""
    import importlib.util

    for name in names:
        if name not in TRACKERS:
            raise ValueError(
                f"unknown tracker {name!r} in train.report_to{did_you_mean(name, TRACKERS)}; "
                f"valid: {', '.join(TRACKERS)}"
            )
        module = EXTRAS.get(name)
        if module and importlib.util.find_spec(module) is None:
            raise ValueError(f"train.report_to has {name!r} but {module} is not installed: pip install {module}")


def finite_scalars(values: Mapping[str, object]) -> dict[str, float]:
    """The entries that are finite numbers (bools and strings, e.g. a reward's first error, dropped)."""
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def open_trackers(names, run_dir: Path, config: dict, resume_step: int | None) -> list[Tracker]:
    return [TRACKERS[name](Path(run_dir), config, resume_step) for name in names]


@tracker("tensorboard")
class TensorBoard:
    def __init__(self, run_dir: Path, config: dict, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _run_id(run_dir: Path, name: str) -> str:
    """A tracker run id kept in the run dir, so that a resumed run continues the same tracker run."""
    import uuid

    path = run_dir / f".{name}_run_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


@tracker("wandb")
class WandB:
    def __init__(self, run_dir: Path, config: dict, resume_step: int | None):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "mhpo"),
            name=run_dir.name,
            id=_run_id(run_dir, "wandb"),
            dir=str(run_dir),
            config=config,
            mode=os.environ.get("WANDB_MODE", "offline"),
            resume="allow",
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()


@tracker("trackio")
class Trackio:
    def __init__(self, run_dir: Path, config: dict, resume_step: int | None):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(
            project=os.environ.get("TRACKIO_PROJECT", "mhpo"),
            name=f"{run_dir.name}-{_run_id(run_dir, 'trackio')}",
            config=config,
            resume="allow",
        )

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()
