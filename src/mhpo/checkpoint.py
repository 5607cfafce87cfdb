"""Checkpoints: safetensors + JSON, written atomically, enough to continue a run bit-for-bit on CPU.

    <run>/checkpoints/step_000050/
        config.json, model.safetensors, generation_config.json, tokenizer files   (a loadable HF model)
        optimizer.safetensors      AdamW moments and step counts, keyed "state.<param index>.<name>"
        rng.safetensors            torch CPU (and CUDA) generator states
        trainer_state.json         step, optimizer param groups, scheduler, python/numpy RNG states,
                                   prompt-source state, run bookkeeping   (written last)
    <run>/checkpoints/latest       name of the newest complete checkpoint

A checkpoint is written into ``.tmp-step_N-<pid>``, fsynced, then renamed into place (an atomic
rename), and only then is ``latest`` replaced (write a temp file, fsync, os.replace). A run killed at
any moment leaves either the previous complete checkpoint or the new one, never a torn one; stale
temp dirs are removed on resume. Nothing is pickled and nothing is read with ``torch.load``.
"""

from __future__ import annotations

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

STATE_FILE = "trainer_state.json"
FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


# ---------------------------------------------------------------------------------------------
# Fault injection for tests: MHPO_FAULT=checkpoint:<step> dies halfway through writing that
# checkpoint; MHPO_FAULT=step:<step> dies right after that step's metrics are logged.


def maybe_fault(point: str, step: int) -> None:
    spec = os.environ.get("MHPO_FAULT", "")
    if spec and spec == f"{point}:{step}":
        os._exit(75)  # like SIGKILL: no cleanup, no finally blocks, no flushing of Python buffers


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
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()} for g in js["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})  # JSON turned tuples (betas) into lists


# ---------------------------------------------------------------------------------------------
# Atomic files and directories.


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def publish_dir(tmp: Path, final: Path) -> None:
    """fsync ``tmp`` and rename it to ``final`` (replacing an existing ``final``)."""
    _fsync_tree(tmp)
    if final.exists():
        trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)


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
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict,
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, prune to the newest ``keep``."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    opt_js, opt_tensors = optimizer_state(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    maybe_fault("checkpoint", step)
    rng_js, rng_tensors = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    full = {
        "format": FORMAT,
        "step": step,
        "optimizer": opt_js,
        "scheduler": scheduler.state_dict(),
        "rng": rng_js,
        **state,
    }
    (tmp / STATE_FILE).write_text(json.dumps(full, indent=1, sort_keys=True) + "\n")
    final = ckpt_root / name
    publish_dir(tmp, final)
    atomic_write_text(ckpt_root / "latest", name + "\n")
    prune(ckpt_root, keep)
    return final


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
    """The newest complete checkpoint (the ``latest`` pointer, or the highest step if newer)."""
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
    state = json.loads((Path(ckpt) / STATE_FILE).read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {ckpt} has format {state.get('format')!r}; this mhpo reads format {FORMAT}")
    return state


def restore_training_state(ckpt: Path, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Load optimizer and scheduler states and set every RNG; returns the trainer state dict.

    Call this last, right before the training loop continues, so that nothing after it consumes
    random numbers that the uninterrupted run did not.
    """
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    load_optimizer_state(optimizer, state["optimizer"], load_file(str(ckpt / "optimizer.safetensors")))
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"], load_file(str(ckpt / "rng.safetensors")))
    return state
