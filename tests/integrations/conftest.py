"""Shared fixtures of the TRL / verl integration tests: offline environment and random loss inputs."""

from __future__ import annotations

import os

# Before transformers / TRL / verl are imported anywhere: never touch the Hugging Face hub.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def make_batch(
    seed: int,
    B: int = 8,
    T: int = 7,
    *,
    spread: float = 0.6,
    empty_row: bool = False,
    dtype=torch.float64,
):
    """Random verl-style loss inputs: log_prob (leaf, requires grad), old_log_prob, advantages [B, T]
    (one value per row, broadcast like GRPO), response_mask [B, T] bool with varied lengths.

    log r ~ Uniform(-spread, spread): moderate ratios where the engines' definitions coincide.
    """
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3 - 0.05
    log_r = (torch.rand(B, T, generator=g, dtype=dtype) * 2 - 1) * spread
    logp = (old + log_r).clone().requires_grad_(True)
    adv = torch.randn(B, 1, generator=g, dtype=dtype).expand(B, T).clone()
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    if empty_row:
        mask[B // 2] = False
    return logp, old, adv, mask


@pytest.fixture(scope="module", autouse=True)
def _one_thread_per_module(one_torch_thread):
    """Every module of this directory runs tiny tensors on one thread (tests/conftest.py)."""


@pytest.fixture
def batch_factory():
    """``make_batch`` (a fixture, so that test modules need not import this conftest by name)."""
    return make_batch
