"""A run directory: what is in it and how to read it back.

    <run>/config.yaml       the resolved config (:data:`CONFIG_FILE`; a resume checks it against the new one)
    <run>/summary.json      written last, when the run finished (:data:`SUMMARY_FILE`)
    <run>/metrics.jsonl, evals.jsonl, samples/, plots/, tensorboard/   logs (:mod:`mhpo.trainer.metrics`)
    <run>/checkpoints/step_N/, latest                                  (:mod:`mhpo.trainer.checkpoint`)

Which config keys a resume may change, the config's hash, the summary, and which checkpoint of a
run (or a checkpoint directory given directly) is meant by ``mhpo eval RUN_DIR [--checkpoint NAME]``.
"""

from __future__ import annotations

import json
from pathlib import Path

from mhpo.errors import UsageError
from mhpo.models.device import machine_info
from mhpo.trainer.checkpoint import STATE_FILE, complete_checkpoints, latest_checkpoint, verify_checkpoint
from mhpo.trainer.config import Config, ConfigError, config_hash, from_dict, load_config, to_dict
from mhpo.trainer.defaults import UNSET

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"
# Keys that may differ between a run and its resumption (they do not change the computation).
RESUMABLE_CHANGES = ("train.steps", "train.progress", "train.report_to", "train.plots", "train.threads")


def load_run_config(run_dir: Path) -> Config:
    """The config a run directory was trained with (UsageError when there is none, or it is broken)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{str(run_dir)!r} is not a run directory (no {CONFIG_FILE})")
    try:
        return load_config(path)
    except ConfigError as err:
        raise UsageError(f"{path}: {err}") from None


def read_summary(run_dir: Path) -> dict | None:
    """The run's summary.json (None before it finished)."""
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        full = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and not full.endswith(("hparams", "args")):
            out += _diff(va, vb, full + ".")
        elif va != vb:
            out.append(full)
    return out


def _get(tree: dict, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


def config_changes(saved: Config, cfg: Config) -> list[str]:
    """Dotted keys that differ between a run's saved config and ``cfg``, ignoring those a resume may
    change and those ``cfg`` leaves unset (null / auto: the saved run's resolved value stands)."""
    new = to_dict(cfg)
    return [
        k
        for k in _diff(to_dict(saved), new)
        if k not in RESUMABLE_CHANGES and not (k in UNSET and _get(new, k) == UNSET[k])
    ]


def resumed_config(saved: Config, cfg: Config) -> Config:
    """The saved config of a run being resumed, with the keys a resume may change taken from ``cfg``
    (where it sets them)."""
    tree, new = to_dict(saved), to_dict(cfg)
    for key in RESUMABLE_CHANGES:
        if not (key in UNSET and _get(new, key) == UNSET[key]):
            section, name = key.split(".")
            tree[section][name] = new[section][name]
    return from_dict(tree)


def cfg_hash(cfg: Config) -> str:
    """The hash of the config minus the keys a resume may change (checked when a run is resumed)."""
    tree = to_dict(cfg)
    tree["train"] = {k: v for k, v in tree["train"].items() if f"train.{k}" not in RESUMABLE_CHANGES}
    return config_hash(tree)


def config_header() -> str:
    """The comment lines above a run's config.yaml: the values below are resolved, and for what machine."""

    m = machine_info()
    flags = ", ".join(m["cpu_flags"]) or "none of avx2/avx512/bf16"
    return (
        "# The config this run used: null / auto / 0 settings resolved (mhpo.trainer.defaults).\n"
        f"# Resolved on {m['cpu']} ({flags}; {m['cores']} cores), torch {m['torch']}"
        + (f", {m['cuda']}" if m["cuda"] else "")
        + ".\n"
    )


def make_summary(
    cfg: Config,
    run_dir: Path,
    before: dict,
    after: dict,
    warm: dict,
    wall: float,
    plots: list[str],
    final: Path | None = None,
) -> dict:
    """The run's summary.json: "checkpoint" is the final checkpoint (None when train.final_checkpoint
    is none), "checkpoints" the names of every checkpoint left on disk."""
    from mhpo.trainer.checkpoint import complete_checkpoints

    size, k = cfg.eval.size, cfg.eval.pass_k
    out = {
        "complete": True,
        "accuracy_before_rl": before.get("greedy/accuracy"),  # None when eval.size = 0
        "accuracy_after_rl": after.get("greedy/accuracy"),
        "steps": cfg.train.steps,
        "wall_seconds": round(wall, 2),
        "objective": cfg.objective.name,
        "task": cfg.task.name,
        "model": cfg.model.name_or_path,
        "seed": cfg.seed,
        "precision": cfg.model.dtype,
        "lr": cfg.optim.lr,
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "eval_max_new_tokens": cfg.eval.max_new_tokens,
        "threads": cfg.train.threads,
        "machine": machine_info(),
        "heldout_size": size,
        "warmup": warm,
        "run_dir": str(run_dir),
        "checkpoint": str(final) if final is not None else None,
        "checkpoints": [d.name for _, d in complete_checkpoints(run_dir / CHECKPOINTS)],
        "metrics": str(run_dir / "metrics.jsonl"),
        "evals": str(run_dir / "evals.jsonl") if _nonempty(run_dir / "evals.jsonl") else None,
        "tensorboard": str(run_dir / "tensorboard") if "tensorboard" in cfg.train.report_to else None,
        "trackers": list(cfg.train.report_to),
        "plots": plots,
        "config_hash": cfg_hash(cfg),
    }
    if k and size:
        out[f"pass@{k}_before_rl"] = before.get(f"pass@{k}")
        out[f"pass@{k}_after_rl"] = after.get(f"pass@{k}")
    return out


def written_outputs(summary: dict) -> list[str]:
    """The outputs a run wrote, as listed by print_summary: no tensorboard/, plots/ or checkpoints/
    when those were off or empty."""
    out = (
        ["metrics.jsonl"]
        + (["evals.jsonl"] if summary.get("evals") else [])
        + (["samples/"] if summary.get("heldout_size") else [])
    )
    out += ["tensorboard/"] if summary.get("tensorboard") else []
    out += ["plots/"] if summary.get("plots") else []
    out += (
        ["checkpoints/"]
        if summary.get("checkpoints", [summary.get("checkpoint")] if summary.get("checkpoint") else [])
        else []
    )
    return out + ["summary.json"]


def _nonempty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# Which checkpoint: `mhpo eval RUN_DIR`, `mhpo eval --model RUN_DIR`.


def is_run_dir(path: str | Path) -> bool:
    """A training run's directory (it has checkpoints/) or one of its checkpoint directories."""
    p = Path(path).expanduser()
    return (p / STATE_FILE).is_file() or (p.is_dir() and (p / CHECKPOINTS).is_dir())


def resolve_checkpoint(run_dir: Path, checkpoint: str | None) -> tuple[Path, Path]:
    """(run dir, checkpoint dir) from a run dir or a checkpoint dir, and an optional name/path."""
    run_dir = Path(run_dir)
    if (run_dir / STATE_FILE).is_file():  # a checkpoint dir was given
        return run_dir.parent.parent, run_dir
    if not run_dir.is_dir():
        raise UsageError(f"{str(run_dir)!r} is not a directory")
    if checkpoint is None:
        found = latest_checkpoint(run_dir / CHECKPOINTS)
        if found is None:
            raise UsageError(f"{str(run_dir)!r} has no complete checkpoint")
        return run_dir, found
    path = Path(checkpoint)
    if not path.is_dir():
        path = run_dir / CHECKPOINTS / checkpoint
    if not (path / STATE_FILE).is_file():
        names = [d.name for _, d in complete_checkpoints(run_dir / CHECKPOINTS)]
        raise UsageError(
            f"no complete checkpoint {checkpoint!r} in {str(run_dir)!r}; available: {', '.join(names) or 'none'}"
        )
    return run_dir, path


def check_intact(run_dir: Path, ckpt: Path) -> None:
    """UsageError (one line) when the checkpoint's files do not match its manifest, naming the
    problem and the intact checkpoints there are."""
    problem = verify_checkpoint(ckpt)
    if problem is not None:
        others = [
            d.name
            for _, d in complete_checkpoints(Path(run_dir) / CHECKPOINTS)
            if d != ckpt and verify_checkpoint(d) is None
        ]
        raise UsageError(
            f"checkpoint {ckpt} is damaged ({problem}); intact checkpoints: {', '.join(others) or 'none'} "
            "(--checkpoint NAME)"
        )


def save_samples(run_dir: Path, step: int, records: list[dict]) -> None:
    """An evaluation's completions (one JSON object per problem) -> RUN_DIR/samples/step_NNNNNN.jsonl."""
    if records:
        samples = run_dir / "samples"
        samples.mkdir(exist_ok=True)
        (samples / f"step_{step:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
