"""mhpo.models.allocator: freed memory is reused without page faults, and the user can opt out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mhpo.models import allocator

glibc = pytest.mark.skipif(allocator._glibc() is None, reason="mallopt is glibc's; this platform has another libc")

# In a fresh process (the setting is process-wide and permanent): allocate, touch and free a 64 MiB
# buffer 30 times; print whether the setting applied and the minor page faults of each round.
_PROBE = """
import json, resource, torch
from mhpo.models.allocator import keep_freed_memory
applied = keep_freed_memory()
faults = []
for _ in range(30):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buf = torch.empty(16 * 2**20, dtype=torch.float32).fill_(1.0)  # 64 MiB: above glibc's mmap threshold
    del buf
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "again": keep_freed_memory(), "faults": faults}))
"""
PAGES = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")


def _probe(**env) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != allocator.OPT_OUT}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env={**environ, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_a_freed_buffer_is_reused_without_faulting_its_pages_in_again():
    on = _probe()
    assert on["applied"] and on["again"]
    # The heap grows for a few rounds while small blocks settle between the big one's old places (4
    # rounds on a 2-core EPYC, 5 on CI's machine), then every round reuses the same pages.
    assert sum(on["faults"][-10:]) < PAGES // 10, on
    off = _probe(**{allocator.OPT_OUT: "0"})
    assert not off["applied"]
    assert min(off["faults"][-10:]) > PAGES // 2, off  # the system's way: every round faults it in again


@glibc
def test_a_user_who_tunes_malloc_keeps_their_settings():
    assert not _probe(MALLOC_TRIM_THRESHOLD_="1000000")["applied"]
    assert not _probe(GLIBC_TUNABLES="glibc.malloc.mmap_max=10")["applied"]
