"""Call user functions (rewards, answer scorers) in a worker process under a hard time limit per call.

Not a security boundary: the worker runs the code with the user's own permissions, files and
network. What it contains is hangs and crashes: a call that runs too long is killed, not waited for.

    with TimeoutWorker(["pkg.mod:fn", "path/to/file.py:fn"], timeout_s=5) as box:
        outcomes = box.map(0, [(args, kwargs), ...])      # one Outcome per call, in order
        (one,) = box.map(0, [(args, kwargs)], timeout_s=40)  # a longer limit for one call (a batch)

The worker is a fresh Python process running this file as a script (standard library only, so it
starts in milliseconds and never re-runs the caller's ``__main__``). It imports the functions, then
serves calls one at a time and streams each result back. The parent waits at most ``timeout_s``
per call; a call that runs over is abandoned: the worker is killed (SIGKILL), a fresh one is
started, and the remaining calls are resent. A call that raises, or a worker that dies, costs that
one call only. Calls run on the worker's main thread, so signal-based timeouts inside the called
code (math-verify's) still work.

A function may name modules to import at load time (outside any call's time limit) in an attribute
``__mhpo_preload__ = ("module", ...)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe
from pathlib import Path
from typing import Any

LOAD_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Outcome:
    value: Any = None
    error: str | None = None  # "TypeName: message" when the call raised, hung or the worker died
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out


def split_spec(spec: str) -> tuple[str, str]:
    """'pkg.mod:fn' or 'dir/file.py:fn' -> (module or path, function name); ValueError otherwise."""
    target, sep, name = str(spec).rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise ValueError(f"function spec {spec!r} must look like module:function or path/to/file.py:function")
    return target, name


def load_function(spec: str) -> Callable:
    """Import the callable named by ``spec`` (runs the module's top-level code)."""
    target, name = split_spec(spec)
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {target}")
        mod_name = f"_mhpo_fn_{path.stem}_{abs(hash(str(path)))}"
        module = sys.modules.get(mod_name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if fn is None:
        raise AttributeError(f"{target} has no attribute {name!r}")
    if not callable(fn):
        raise TypeError(f"{target}:{name} is not callable")
    for mod in getattr(fn, "__mhpo_preload__", ()):
        importlib.import_module(mod)
    return fn


def serve(conn: Connection) -> None:
    """The worker loop: ('load', specs, paths, cwd) once, then ('call', k, start, calls) or None."""
    _, specs, paths, cwd = conn.recv()
    sys.path[:] = list(dict.fromkeys([*paths, *sys.path]))
    os.chdir(cwd)
    fns, errors = [], []
    for spec in specs:
        try:
            fns.append(load_function(spec))
        except BaseException as err:  # noqa: BLE001  (report anything the user's import does)
            fns.append(None)
            errors.append(f"{spec}: {type(err).__name__}: {err}")
    conn.send(("loaded", errors))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        _, k, start, calls = msg
        for i, (args, kwargs) in enumerate(calls, start):
            try:
                result = ("ok", i, fns[k](*args, **kwargs))
                conn.send(result)
            except BaseException as err:  # noqa: BLE001
                conn.send(("err", i, f"{type(err).__name__}: {err}"))


class TimeoutWorker:
    """One worker process serving the functions in ``specs`` (indexed 0..n-1). POSIX only."""

    def __init__(self, specs: list[str], timeout_s: float, *, load_timeout_s: float = LOAD_TIMEOUT_S):
        for spec in specs:
            split_spec(spec)
        self.specs = list(specs)
        self.timeout_s = float(timeout_s)
        self.load_timeout_s = float(load_timeout_s)
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._loaded: list[str] | None = None
        self._finalizer = None
        self._start()

    # -- process management ------------------------------------------------------------------
    def _start(self) -> None:
        parent, child = Pipe(duplex=True)
        proc = subprocess.Popen(
            [sys.executable, "-u", __file__, str(child.fileno())], pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL
        )
        child.close()
        parent.send(("load", self.specs, [os.getcwd(), *sys.path], os.getcwd()))
        self._proc, self._conn, self._loaded = proc, parent, None
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, TimeoutWorker._stop, proc, parent)

    @staticmethod
    def _stop(proc: subprocess.Popen, conn: Connection) -> None:
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        conn.close()

    def _restart(self) -> None:
        self._finalizer.detach()
        self._proc.kill()
        self._proc.wait()
        self._conn.close()
        self.restarts += 1
        self._start()

    def wait_loaded(self) -> list[str]:
        """Errors from importing the functions ('spec: Type: message'); waits for the worker."""
        if self._loaded is None:
            if not self._conn.poll(self.load_timeout_s):
                self._restart()
                return [f"{s}: import did not finish within {self.load_timeout_s:.0f} s" for s in self.specs]
            try:
                _, errors = self._conn.recv()
            except (EOFError, OSError):
                self._restart()
                return [f"{s}: the worker process died while importing" for s in self.specs]
            self._loaded = errors
        return self._loaded

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- calls -------------------------------------------------------------------------------
    def map(self, k: int, calls: list[tuple[tuple, dict]], *, timeout_s: float | None = None) -> list[Outcome]:
        """Call function ``k`` once per (args, kwargs); one Outcome per call, in order.

        Each call may run ``timeout_s`` seconds (default: the worker's ``timeout_s``)."""
        limit = self.timeout_s if timeout_s is None else float(timeout_s)
        out: list[Outcome] = [Outcome()] * len(calls)
        start = 0
        while start < len(calls):
            errors = self.wait_loaded()
            if errors:
                raise RuntimeError(errors[0])
            self._conn.send(("call", k, start, calls[start:]))
            start = self._collect(out, start, limit)
        return out

    def _collect(self, out: list[Outcome], i: int, limit: float) -> int:
        """Receive results from index i on; on a hang or crash, restart and return the next index."""
        while i < len(out):
            if not self._conn.poll(limit):
                out[i] = Outcome(timed_out=True, error=f"TimeoutError: no result within {limit:g} s")
                self._restart()
                return i + 1
            try:
                kind, idx, payload = self._conn.recv()
            except (EOFError, OSError):
                out[i] = Outcome(error="WorkerDied: the scoring process exited")
                self._restart()
                return i + 1
            out[idx] = Outcome(value=payload) if kind == "ok" else Outcome(error=payload)
            i = idx + 1
        return i


if __name__ == "__main__":  # the worker process
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # never let this package's modules shadow top-level ones (config, tokenizer, ...)
    import signal

    # Ctrl-C reaches the whole process group: the parent stops the run and then this worker (its pipe closes).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(Connection(int(sys.argv[1])))
