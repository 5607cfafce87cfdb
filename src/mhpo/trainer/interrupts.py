"""Ctrl-C and SIGTERM during training, turned into a clean stop.

``with Interrupts() as stop:`` makes SIGINT and SIGTERM raise KeyboardInterrupt in the main thread,
except inside ``with stop.shield():`` (the optimizer steps of an RL step, a checkpoint being
written): there the signal is held and raised when the block ends, so the weights are never left
halfway through a step. A second signal inside a shield raises at once (``stop.forced`` is then
True: the step's state is torn). Outside the main thread (a test's worker thread) it does nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    def __init__(self):
        self.depth = 0  # nesting of shield()
        self.pending: int | None = None  # a signal held by a shield
        self.forced = False  # raised inside a shield (second signal)
        self.signal: int | None = None  # the signal that stopped the run
        self._old: dict = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        if self.depth and self.pending is None:
            self.pending = signum
            return
        self.forced = bool(self.depth)
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def shield(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0 and self.pending is not None:
            self.pending = None
            raise KeyboardInterrupt

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "KeyboardInterrupt"
