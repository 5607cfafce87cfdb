"""Checkpoints: safetensors + JSON, written atomically, enough to continue a run bit-for-bit on CPU.

    <run>/checkpoints/step_000050/
        config.json, model.safetensors, generation_config.json, tokenizer files   (a loadable HF model)
        optimizer.safetensors      AdamW moments and step counts, keyed "state.<param index>.<name>"
        rng.safetensors            torch CPU (and CUDA) generator states
        pending.safetensors        batches sampled for later steps (rollout.staleness > 0; their JSON
                                   is the state's "pending")
        trainer_state.json         step, optimizer param groups, scheduler, python/numpy RNG states,
                                   prompt-source state, run bookkeeping, and the manifest: size and
                                   sha256 of every other file, plus a sha256 of the JSON itself
                                   ("checksum")   (written last)
    <run>/checkpoints/latest       name of the newest complete checkpoint

A LoRA run's checkpoints (model.lora.rank > 0) hold adapter_model.safetensors and adapter_config.json
(:mod:`mhpo.models.lora`; the config names the base model) in place of the model files, and the
optimizer state is over the adapters only; everything else is the same.

Kinds: "full" (the above; ``save_optimizer=False`` leaves out optimizer.safetensors, and a resume
from such a checkpoint restarts AdamW with zero moments, with a warning) and "model" (the HF model
and tokenizer files and a trainer_state.json with step, kind and manifest only: loadable by
``from_pretrained`` and ``mhpo eval``, never resumed from).

Integrity: :func:`verify_checkpoint` recomputes sizes and checksums; :func:`resume_checkpoint`
returns the newest intact, resumable checkpoint, warning about each damaged one it skips, and
raises :class:`CheckpointError` (one line) when checkpoints exist but none is intact. Checkpoints
written before manifests existed have no "files" entry and are trusted as they are.

A checkpoint is written into ``.tmp-step_N-<pid>``, fsynced, then renamed into place (an atomic
rename), and only then is ``latest`` replaced (write a temp file, fsync, os.replace). A run killed at
any moment leaves either the previous complete checkpoint or the new one, never a torn one; stale
temp dirs are removed on resume. Nothing is pickled and nothing is read with ``torch.load``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mhpo.errors import UsageError
from mhpo.files import atomic_write_text, file_sha256, publish_dir
from mhpo.models.lora import save_weights

STATE_FILE = "trainer_state.json"
PENDING_FILE = "pending.safetensors"
FORMAT = 1
KINDS = ("full", "model")
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(UsageError):
    """A damaged, unreadable or unusable checkpoint; the message is one line naming it (the
    command line prints it without a traceback)."""


# ---------------------------------------------------------------------------------------------
# Fault injection for tests: MHPO_FAULT=checkpoint:<step> dies halfway through writing that
# checkpoint; MHPO_FAULT=step:<step> dies right after that step's metrics are logged;
# MHPO_FAULT=sigint@<point>:<step> sends this process SIGINT there instead (a Ctrl-C at a known moment:
# points "step-start" before the step samples, "update" once its update has begun).


def maybe_fault(point: str, step: int) -> None:
    spec = os.environ.get("MHPO_FAULT", "")
    if not spec:
        return
    if spec == f"{point}:{step}":
        os._exit(75)  # like SIGKILL: no cleanup, no finally blocks, no flushing of Python buffers
    if spec == f"sigint@{point}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGINT)


# ---------------------------------------------------------------------------------------------
# Random number generator states.


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON part, tensor part) of the python, numpy-global, torch CPU and CUDA generator states."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    js = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    return js, tensors


def set_rng_state(js: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = js["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


# ---------------------------------------------------------------------------------------------
# Optimizer state as tensors + JSON.


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return {"param_groups": sd["param_groups"], "scalars": scalars}, tensors


def load_optimizer_state(optimizer: torch.optim.Optimizer, js: dict, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in js.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    groups = [
        {k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
        for g in js["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})  # JSON turned tuples (betas) into lists


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    *,
    model,
    tokenizer,
    optimizer: torch.optim.Optimizer | None,
    scheduler,
    state: dict,
    keep: int,
    kind: str = "full",
    save_optimizer: bool = True,
    pending: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, prune to the newest ``keep``.

    kind "full": everything a resume needs (optimizer tensors only with ``save_optimizer``; the
    tensors of batches sampled for later steps, ``pending``, in pending.safetensors);
    kind "model": the model and tokenizer only (optimizer, scheduler and state are ignored)."""
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(model, tmp)
    tokenizer.save_pretrained(tmp)
    full: dict[str, Any] = {"format": FORMAT, "step": step, "kind": kind}
    if kind == "full":
        opt_js, opt_tensors = optimizer_state(optimizer)
        if save_optimizer:
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        maybe_fault("checkpoint", step)
        rng_js, rng_tensors = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        if pending:
            save_file(pending, str(tmp / PENDING_FILE))
        full.update(
            {
                "optimizer": opt_js,
                "optimizer_saved": bool(save_optimizer),
                "scheduler": scheduler.state_dict(),
                "rng": rng_js,
                **state,
            }
        )
    full["files"] = manifest(tmp)
    (tmp / STATE_FILE).write_text(dump_state(full))
    final = ckpt_root / name
    publish_dir(tmp, final)
    atomic_write_text(ckpt_root / "latest", name + "\n")
    prune(ckpt_root, keep)
    return final


# ---------------------------------------------------------------------------------------------
# Integrity: a manifest of sizes and checksums, and a checksum of the state JSON itself.


def manifest(ckpt: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"size": bytes, "sha256": hex}} of every file in ``ckpt`` but the state file."""
    ckpt = Path(ckpt)
    out = {}
    for f in sorted(ckpt.rglob("*")):
        rel = f.relative_to(ckpt).as_posix()
        if f.is_file() and rel != STATE_FILE:
            out[rel] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
    return out


def _json_checksum(state: dict) -> str:
    body = {k: v for k, v in state.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def dump_state(state: dict) -> str:
    """The state JSON with its own checksum (sha256 of the compact sorted JSON of the rest)."""
    return json.dumps({**state, "checksum": _json_checksum(state)}, indent=1, sort_keys=True) + "\n"


def verify_checkpoint(ckpt: Path) -> str | None:
    """None when ``ckpt`` is intact, else the first problem in a few words
    ('model.safetensors: sha256 mismatch', 'rng.safetensors: missing', 'trainer_state.json: not valid JSON')."""
    ckpt = Path(ckpt)
    try:
        state = read_state(ckpt)
    except CheckpointError as err:
        return str(err).split(": ", 1)[-1]
    if "checksum" in state and state["checksum"] != _json_checksum(state):
        return f"{STATE_FILE}: checksum mismatch"
    files = state.get("files")
    if files is None:
        return None  # written before manifests: trusted as is
    if not isinstance(files, dict):
        return f"{STATE_FILE}: bad manifest"
    for rel, info in files.items():
        f = ckpt / rel
        if not f.is_file():
            return f"{rel}: missing"
        try:
            size, digest = info["size"], info["sha256"]
        except (TypeError, KeyError):
            return f"{STATE_FILE}: bad manifest entry for {rel}"
        if f.stat().st_size != size:
            return f"{rel}: size {f.stat().st_size} bytes, expected {size}"
        if file_sha256(f) != digest:
            return f"{rel}: sha256 mismatch"
    return None


def is_resumable(state: dict) -> bool:
    return state.get("kind", "full") == "full"


def resume_checkpoint(ckpt_root: Path, warn=print) -> Path | None:
    """The newest intact, resumable checkpoint; None when there is no checkpoint at all.

    Each damaged checkpoint passed over is reported with ``warn(line)``; a model-only one is skipped
    silently when an older full one exists. Raises CheckpointError when none of them can be resumed."""
    found = complete_checkpoints(ckpt_root)
    skipped = []
    for _, d in reversed(found):
        problem = verify_checkpoint(d)
        if problem is None and not is_resumable(read_state(d)):
            problem = "holds only the model (train.final_checkpoint=model)"
        elif problem is not None:
            warn(f"warning: checkpoint {d} is damaged ({problem}); skipping it")
        if problem is None:
            return d
        skipped.append(f"{d.name}: {problem}")
    if skipped:
        raise CheckpointError(f"no intact checkpoint to resume from in {str(Path(ckpt_root))!r} ({'; '.join(skipped)})")
    return None


def complete_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint, oldest first."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    out = []
    for d in ckpt_root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / STATE_FILE).is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The complete checkpoint with the highest step (None when there is none)."""
    found = complete_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def prune(ckpt_root: Path, keep: int) -> None:
    found = complete_checkpoints(ckpt_root)
    for _, d in found[: max(len(found) - keep, 0)]:
        shutil.rmtree(d, ignore_errors=True)


def clean_partial(ckpt_root: Path) -> None:
    """Remove temp and trash dirs left by a run killed while writing a checkpoint."""
    ckpt_root = Path(ckpt_root)
    if ckpt_root.is_dir():
        for d in ckpt_root.iterdir():
            if d.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)


def read_state(ckpt: Path) -> dict:
    """The parsed trainer_state.json; CheckpointError 'checkpoint DIR: trainer_state.json: <problem>'."""
    path = Path(ckpt) / STATE_FILE
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt}: {STATE_FILE}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"checkpoint {ckpt}: {STATE_FILE}: not valid JSON") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint {ckpt}: {STATE_FILE}: not a trainer state")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {ckpt} has format {state.get('format')!r}; this mhpo reads format {FORMAT}")
    return state


def load_pending(ckpt: Path) -> dict[str, torch.Tensor]:
    """The tensors of the batches a checkpoint holds for later steps (none: {})."""
    return _load_tensors(ckpt, PENDING_FILE) if (Path(ckpt) / PENDING_FILE).is_file() else {}


def _load_tensors(ckpt: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(Path(ckpt) / name))
    except Exception as err:  # SafetensorError, OSError: a damaged file that the manifest did not catch
        raise CheckpointError(
            f"checkpoint {ckpt} is damaged ({name}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None


def restore_training_state(ckpt: Path, optimizer: torch.optim.Optimizer, scheduler, warn=print) -> dict:
    """Load optimizer and scheduler states and set every RNG; returns the trainer state dict.

    A checkpoint saved with ``save_optimizer=False`` has no optimizer tensors: AdamW then restarts
    (zero moments, step 0) and ``warn`` says so; the lr schedule and every RNG are still restored.
    Call this last, right before the training loop continues, so that nothing after it consumes
    random numbers that the uninterrupted run did not.
    """
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    if not is_resumable(state):
        raise CheckpointError(
            f"checkpoint {ckpt} holds only the model (train.final_checkpoint=model); it cannot be resumed"
        )
    if state.get("optimizer_saved", True):
        try:
            load_optimizer_state(optimizer, state["optimizer"], _load_tensors(ckpt, "optimizer.safetensors"))
        except (KeyError, ValueError, RuntimeError) as err:
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(
                f"checkpoint {ckpt}: the optimizer state does not fit this model ({type(err).__name__})"
            ) from None
    else:
        warn(
            f"warning: checkpoint {ckpt.name} was saved without optimizer state (train.save_optimizer=false): "
            "AdamW restarts from zero moments, so this run will not match an uninterrupted one"
        )
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"], _load_tensors(ckpt, "rng.safetensors"))
    return state
