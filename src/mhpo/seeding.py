"""Named, independent seeds derived from the run seed, so that each stage's randomness does not
depend on what ran before it (a cached warm-up and a fresh one lead to the same RL run).

    derive_seed(seed, tag) = int(sha256(f"{seed}:{tag}")[:8], 16) mod 2^31
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, tag: str) -> int:
    return int(hashlib.sha256(f"{seed}:{tag}".encode()).hexdigest()[:8], 16) % (2**31)
