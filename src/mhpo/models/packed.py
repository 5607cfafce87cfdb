"""Linear layers through oneDNN with prepacked weights while a float32 model decodes on an x86 CPU.

    y = x W^T + b        x [..., K], W [N, K] -> y [..., N]; the same product, another kernel

A decode step multiplies each weight by the few rows still decoding (8-32 here). PyTorch's
``F.linear`` hands that to MKL's sgemm with a transposed weight, which runs far below the CPU's rate
at so few rows; oneDNN with the weight reordered once into its blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``, the packing ``torch.compile`` does for frozen CPU
models) does not. Measured on a 2-core AMD EPYC with AVX2 and no AVX512 (2 threads, float32,
GFLOP/s, ``F.linear`` -> packed): SmolLM2-135M's LM head 576 -> 49,152 at 8 rows 25 -> 59-62, at 32
rows 57-68 -> 109-118; 576 -> 1536 at 8 / 32 rows 50 / 70 -> 74 / 105; 576 -> 192 at 8 / 32 rows
42 / 100 -> 49 / 109. Reordering all of SmolLM2-135M's linear weights takes 0.14-0.3 s, once per
decode call (the weights change between calls). A oneDNN call costs ~10 us more than MKL's, so
small weights lose (128 x 64: 7 -> 19 us at 8 rows) and stay on ``F.linear``: only weights with at
least :data:`MIN_ELEMENTS` entries are packed, which leaves the built-in tiny models untouched.

Values equal ``F.linear``'s up to float32 rounding (another summation order). Off x86, under autocast,
with gradients on, for other dtypes or Linear subclasses (LoRA layers: their base Linear is packed),
nothing changes. ``MHPO_ONEDNN_DECODE=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import os
import platform

import torch

OPT_OUT = "MHPO_ONEDNN_DECODE"
# Weights with fewer entries stay on F.linear: oneDNN's ~10 us a call outweighs its gain below this
# (measured: 128 x 512 ties at 32 rows and loses at 8; 576 x 192 = 110,592 gains at 8 and 32 rows).
MIN_ELEMENTS = 100_000


def onednn_usable(device: torch.device) -> bool:
    """Whether packed oneDNN linears may run on ``device`` now: an x86 CPU with oneDNN, no autocast
    there (bf16-mixed keeps its own casts), and not switched off with ``MHPO_ONEDNN_DECODE=0``."""
    return (
        device.type == "cpu"
        and platform.machine().lower() in ("x86_64", "amd64")
        and torch.backends.mkldnn.is_available()
        and os.environ.get(OPT_OUT, "1") != "0"
        and not torch.is_autocast_enabled("cpu")
    )


def packable(module: torch.nn.Module, min_elements: int | None = None) -> bool:
    """A plain ``nn.Linear`` on the CPU with a float32 weight of >= ``min_elements`` entries
    (:data:`MIN_ELEMENTS` by default) whose ``forward`` nobody has replaced on the instance (e.g.
    accelerate's hooks)."""
    weight = getattr(module, "weight", None)
    min_elements = MIN_ELEMENTS if min_elements is None else min_elements
    return (
        type(module) is torch.nn.Linear
        and "forward" not in vars(module)
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.numel() >= min_elements
    )


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module, *, rows: int = 32, min_elements: int | None = None):
    """Inside the block, every :func:`packable` Linear of ``model`` multiplies through a copy of its
    weight packed for oneDNN (``rows``: the batch the packing is tuned for); at its end the copies are
    dropped and each module's own ``forward`` is back. The weights must not change inside the block;
    a call with gradients on, or with an input that is not float32, runs the module's own forward.
    Where :func:`onednn_usable` says no, nothing changes."""
    device = next(model.parameters()).device
    patched: list[torch.nn.Module] = []
    try:
        if onednn_usable(device):
            for module in model.modules():
                if packable(module, min_elements):
                    packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), max(rows, 1))
                    module.forward = _packed_forward(module, packed)
                    patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward


def _packed_forward(module: torch.nn.Linear, packed: torch.Tensor):
    """``module``'s forward through ``packed`` (its weight in oneDNN's layout)."""
    own = type(module).forward
    bias = None if module.bias is None else module.bias.detach()

    def forward(x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        if torch.is_grad_enabled() or x.dtype != torch.float32 or x.numel() == 0:
            return own(module, x)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")  # [M, N]
        return y.reshape(*x.shape[:-1], y.shape[-1])

    return forward
