"""Where and how a model computes: the device, the usable cores, the precision (weights' dtype and
bf16 autocast) resolved from ``model.dtype`` and the CPU's flags, and a record of the machine."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else mps if available, else cpu; otherwise ``torch.device(name)``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"model.device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device {name!r}: CUDA is not available on this machine")
    return device


@dataclass(frozen=True)
class Precision:
    """How a model computes: the dtype its weights are stored in, and the autocast dtype of its
    matmuls (None: none). ``bf16-mixed`` keeps float32 master weights and runs the forward passes
    (sampling, log-probs, the update) under bfloat16 autocast; log-probs and the objective stay
    float32 (:mod:`mhpo.models.logprobs` computes them with autocast off)."""

    weights: torch.dtype
    autocast: torch.dtype | None = None

    @property
    def name(self) -> str:
        if self.autocast is not None:
            return "bf16-mixed"
        return str(self.weights).removeprefix("torch.")

    def context(self, device: torch.device):
        """The autocast context for ``device`` (a no-op context when not mixed).

        Its weight-cast cache is off: autocast's cache keeps the first low-precision copy of every
        weight until the outermost context exits, so an RL step run inside one context would compute
        every minibatch after the first with the weights from before the optimizer steps. Each
        forward casts the current weights instead; a no-grad pass that runs many forwards on fixed
        weights (the decode loop) caches its casts with :func:`cast_weights_once`."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast, cache_enabled=False)


@contextlib.contextmanager
def cast_weights_once(device: torch.device):
    """Inside an enabled autocast: cache each weight's low-precision copy for the block (weights must
    not change inside it) and drop the copies at its end. Elsewhere: nothing."""
    if not torch.is_autocast_enabled(device.type):
        yield
        return
    try:
        with torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type), cache_enabled=True):
            yield
    finally:
        torch.clear_autocast_cache()


DTYPES = ("auto", "float32", "bfloat16", "float16", "bf16-mixed")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; all cores where that is unknown: macOS)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def read_cpuinfo() -> str:
    """/proc/cpuinfo's text ('' where there is none: macOS, Windows)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX-BF16).

    Without them PyTorch emulates bf16 matmuls: measured 1.0 GFLOP/s against 111 in float32 on a
    2-core AVX2 EPYC, i.e. bf16 autocast would make every forward pass ~100x slower. Linux reads the
    CPU flags (``cpuinfo``: that file's text, for tests); elsewhere oneDNN's own bf16 check decides."""
    text = read_cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def machine_info(cpuinfo: str | None = None) -> dict:
    """What computed a run, for its records: CPU model, its bf16 / AVX-512 flags, cores, torch version."""
    import platform

    text = read_cpuinfo() if cpuinfo is None else cpuinfo
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = sorted(set(fields.get("flags", "").split()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    return {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "cpu_flags": flags,
        "cpu_bf16": cpu_has_bf16(text),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def resolve_precision(name: str, device: torch.device, *, built_in: bool = False) -> Precision:
    """model.dtype -> Precision. 'auto': bf16 weights on a GPU that supports bf16; bf16-mixed on a CPU
    with native bf16 matmuls (:func:`cpu_has_bf16`; on 2 AVX512-BF16 cores a 2048x576x1536 matmul is
    reported at 406 GFLOP/s in bf16 against 149 in float32), except for the built-in tiny models (matrices too small to
    gain; the demo's numbers are float32's); float32 otherwise."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16)
        if device.type == "cpu" and not built_in and cpu_has_bf16():
            return Precision(torch.float32, torch.bfloat16)
        return Precision(torch.float32)
    if name == "bf16-mixed":
        return Precision(torch.float32, torch.bfloat16)
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown model.dtype {name!r}; valid: {', '.join(DTYPES)}")
    return Precision(table[name])
