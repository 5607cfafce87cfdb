"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist (``scripts/test.sh``), each worker runs on its own share of the cores.

    The code under test sizes its thread pools by the cores it may use (its CPU affinity:
    ``mhpo.models.device.usable_cores``). Every worker seeing every core oversubscribes them: two
    real-model tests of 2 threads each on a 2-core machine ran 3x slower than one after the other,
    a thread waiting at each parallel region for one descheduled. Worker i gets cores i, i + n, ...
    (n workers); processes it starts inherit that."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    mine = cores[int(worker.removeprefix("gw")) :: count]
    if mine:
        os.sched_setaffinity(0, mine)
        torch.set_num_threads(len(mine))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny-model tests (two threads on tiny matrices thrash a
    busy 2-core machine, ~30x slower); the previous count is restored after the module. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
