"""Named, independent seeds derived from the run seed, so that each stage's randomness does not
depend on what ran before it (a cached warm-up and a fresh one lead to the same RL run); and a
block of code under a private RNG that leaves the outer one untouched.

    derive_seed(seed, tag) = int(sha256(f"{seed}:{tag}")[:8], 16) mod 2^31
"""

from __future__ import annotations

import contextlib
import hashlib

import torch


def derive_seed(seed: int, tag: str) -> int:
    return int(hashlib.sha256(f"{seed}:{tag}".encode()).hexdigest()[:8], 16) % (2**31)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Run a block under a private torch RNG seeded with ``seed`` (the outer state is restored)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
