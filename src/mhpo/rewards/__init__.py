"""Reward scoring: resolve ``rewards.functions``, run them in a timeout worker process, combine the scores.

Functions are called the way TRL's GRPOTrainer calls them: once per batch, with every completion,

    f(prompts=[...], completions=[...], completion_ids=[[int, ...], ...], answer=[...], trainer_state=...,
      **columns) -> list[float]                                  (one score per completion)

- ``prompts``: each example's prompt as it is (a string, or a list of chat messages);
- ``completions``: TRL's form, ``[{"role": "assistant", "content": text}]`` where the example's prompt
  is conversational (a list of messages), the plain string otherwise;
- ``completion_ids``: the completions' token ids as lists of ints, when the caller passes them;
- ``answer`` and every dataset column (``Example.columns``) as lists, one entry per completion;
- ``trainer_state``: whatever the caller passes (None by default; TRL passes its TrainerState).

The functions are the built-ins of :mod:`mhpo.rewards.functions` (exact_match, last_number,
math_verify, reasoning_gym), ``auto`` (the task's verifier), or user functions named
``module:function`` / ``path/to/file.py:function``. They run in a worker process with a hard time
limit (:mod:`mhpo.rewards.timeout_worker`): the batch call may take ``timeout_s`` per completion,
``timeout_s * len(completions)`` in all. When the batch call raises, runs over, or returns something
other than a list of one score per completion, its completions are scored again one by one
(one-element lists, ``timeout_s`` each), so a completion that hangs or crashes the function costs
that completion only: it scores 0 and is counted (``reward/errors``, ``reward/timeouts``); so does a
score that is not a number, NaN or inf (None scores 0 and is not counted, as in TRL).
``Scores.fallbacks`` says which functions fell back, and why.

    total_i = sum_j w_j f_j(i)              correct_i = f_0(i) >= 1   (the first function)

A broken function stops the run (:class:`RewardFunctionError`, one line naming it) instead:

- a one-by-one call whose result is not a list of one score (wrong length, a bare number, None):
  a programming error, at once;
- the error budget (:class:`ErrorBudget`): a function that fails (raises, times out, returns a
  non-number) on every completion of the first batch it scores, or on more than
  ``rewards.max_error_frac`` (default 0.5) of its completions over the last ``rewards.error_window``
  (default 20) batches. A batch is one :meth:`RewardScorer.score` call: an RL step scores one, an
  evaluation one (greedy) or two (with pass@k). A scorer that fails now and then never stops a run;
  ``rewards.max_error_frac=1`` turns the window rule off.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mhpo.errors import UsageError

_BUILTIN_FILE = Path(__file__).with_name("functions.py")
BUILTIN: dict[str, str] = {
    name: f"{_BUILTIN_FILE}:{name}" for name in ("exact_match", "last_number", "math_verify", "reasoning_gym")
}
CORRECT_AT = 1.0 - 1e-6


# ---------------------------------------------------------------------------------------------
# Resolution and scoring (parent process).


def resolve(names: Sequence[str], task_reward: str) -> list[tuple[str, str]]:
    """(metric name, worker spec) per configured function; 'auto' is the task's verifier."""
    out = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"rewards.functions entries must be names or module:function specs, got {name!r}")
        name = task_reward if name == "auto" else name
        if name in BUILTIN:
            out.append((name, BUILTIN[name]))
            continue
        if ":" not in name:
            from mhpo.errors import did_you_mean

            raise ValueError(
                f"unknown reward function {name!r}{did_you_mean(name, BUILTIN)}; valid: auto, {', '.join(BUILTIN)}, "
                "module:function, path/to/file.py:function"
            )
        from mhpo.rewards.timeout_worker import split_spec

        target, fn = split_spec(name)
        _check_target(name, target)
        out.append((fn, name))
    metric_names = [n for n, _ in out]
    if len(set(metric_names)) != len(metric_names):
        raise ValueError(f"rewards.functions names a function twice: {', '.join(metric_names)}")
    return out


def _check_target(spec: str, target: str) -> None:
    import importlib.util
    from pathlib import Path

    if target.endswith(".py"):
        if not Path(target).expanduser().is_file():
            raise ValueError(f"reward function {spec!r}: file {target!r} does not exist")
        return
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise ValueError(f"reward function {spec!r}: module {target!r} cannot be found on the Python path")


class RewardFunctionError(UsageError):
    """A reward function is broken (see the module docstring): one line, and the run stops."""


def one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line (newlines folded into spaces), cut to ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class ErrorBudget:
    """Per reward function: stop when it is broken, not when it is flaky.

    stop  if  failures(first batch) == calls(first batch) > 0
    or        sum failures / sum calls > max_frac   over the last ``window`` batches
                                                   (checked once ``window`` batches were seen)
    """

    def __init__(self, max_frac: float = 0.5, window: int = 20):
        if not 0 < max_frac <= 1:
            raise ValueError(f"rewards.max_error_frac={max_frac!r} must be in (0, 1]")
        if window < 1:
            raise ValueError(f"rewards.error_window={window!r} must be >= 1")
        self.max_frac, self.window = float(max_frac), int(window)
        self._seen: dict[str, deque] = {}  # name -> deque of (failures, calls, first error or None)

    def record(self, name: str, failures: int, calls: int, first_error: str | None) -> str | None:
        """Add one batch of function ``name``; the one-line reason to stop, or None."""
        if calls <= 0:
            return None
        first_batch = name not in self._seen
        seen = self._seen.setdefault(name, deque(maxlen=self.window))
        seen.append((failures, calls, first_error))
        if first_batch and failures == calls:
            return (
                f"reward function {name!r} failed on all {calls} completion(s) of the first batch it scored "
                f"(first error: {one_line(first_error or 'unknown')})"
            )
        if len(seen) < self.window:
            return None
        fails, total = sum(f for f, _, _ in seen), sum(c for _, c, _ in seen)
        if fails > self.max_frac * total:
            first = next((e for _, _, e in seen if e), "unknown")
            return (
                f"reward function {name!r} failed on {fails} of {total} completions ({fails / total:.0%}) over the "
                "last "
                f"{len(seen)} scoring batches, more than rewards.max_error_frac={self.max_frac:g} "
                f"(first error: {one_line(first)})"
            )
        return None


@dataclass
class Scores:
    """Scores of one batch of completions (all lists have one entry per completion)."""

    total: list[float]
    per_function: dict[str, list[float]]
    correct: list[bool]
    errors: int = 0
    timeouts: int = 0
    messages: list[str] = field(default_factory=list)  # the first few error messages
    failures: dict[str, int] = field(default_factory=dict)  # per function: errors + timeouts
    fallbacks: list[str] = field(default_factory=list)  # "name: why" per function scored one by one


# Keyword names of the call itself; a dataset column of one of these names is not passed.
RESERVED = ("prompts", "completions", "completion_ids", "trainer_state")


def is_conversational(prompt: Any) -> bool:
    """Whether ``prompt`` is a list of chat messages ({"role": ..., "content": ...}), as TRL decides it."""
    return (
        isinstance(prompt, (list, tuple)) and len(prompt) > 0 and isinstance(prompt[0], Mapping) and "role" in prompt[0]
    )


def trl_completion(prompt: Any, text: str) -> Any:
    """The completion as TRL hands it to reward functions: a one-message list for a conversational prompt."""
    return [{"role": "assistant", "content": text}] if is_conversational(prompt) else text


def trl_call(
    examples: Sequence[Any],
    completions: Sequence[str],
    completion_ids: Sequence[Sequence[int]] | None = None,
    trainer_state: Any = None,
) -> tuple[tuple, dict]:
    """(args, kwargs) of one TRL-style call on the whole batch (see the module docstring)."""
    prompts = [ex.prompt for ex in examples]
    kwargs: dict[str, Any] = {}
    for key in dict.fromkeys(k for ex in examples for k in ex.columns):
        if key not in RESERVED:
            kwargs[key] = [ex.columns.get(key) for ex in examples]
    kwargs["answer"] = [ex.answer for ex in examples]
    if completion_ids is not None:
        kwargs["completion_ids"] = [[int(t) for t in ids] for ids in completion_ids]
    kwargs["trainer_state"] = trainer_state
    return (prompts, [trl_completion(p, c) for p, c in zip(prompts, completions)]), kwargs


def split_call(call: tuple[tuple, dict], n: int) -> list[tuple[tuple, dict]]:
    """The batch call as n one-completion calls: every per-completion list cut to its i-th element."""
    args, kwargs = call

    def part(value, i):
        return value[i : i + 1] if isinstance(value, list) and len(value) == n else value

    return [(tuple(part(a, i) for a in args), {k: part(v, i) for k, v in kwargs.items()}) for i in range(n)]


class RewardScorer:
    """Weighted sum of reward functions, each called once per batch (TRL's way) in the timeout worker."""

    def __init__(
        self,
        names: Sequence[str],
        task_reward: str,
        weights: Sequence[float] | None,
        timeout_s: float,
        *,
        max_error_frac: float = 0.5,
        error_window: int = 20,
    ):
        self.functions = resolve(names, task_reward)
        self.budget = ErrorBudget(max_error_frac, error_window)
        if weights is None:
            weights = [1.0] * len(self.functions)
        if len(weights) != len(self.functions) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights
        ):
            raise ValueError(
                f"rewards.weights={list(weights)!r} must be {len(self.functions)} finite number(s), one per function"
            )
        self.weights = [float(w) for w in weights]
        from mhpo.rewards.timeout_worker import TimeoutWorker

        self.worker = TimeoutWorker([spec for _, spec in self.functions], timeout_s)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.functions]

    def check(self) -> None:
        """Wait for the worker to import every function; ValueError naming the first that failed."""
        errors = self.worker.wait_loaded()
        if errors:
            raise ValueError(f"reward function {errors[0]}")

    def score(
        self,
        examples: Sequence[Any],
        completions: Sequence[str],
        *,
        completion_ids: Sequence[Sequence[int]] | None = None,
        trainer_state: Any = None,
    ) -> Scores:
        """Score completion i against examples[i] (an Example: prompt, answer, columns); ``completion_ids[i]``
        are its token ids, passed on as lists of ints; ``trainer_state`` is passed as it is (picklable).

        Raises RewardFunctionError when a function is broken (see the module docstring)."""
        n = len(examples)
        if len(completions) != n or (completion_ids is not None and len(completion_ids) != n):
            ids = "" if completion_ids is None else f", {len(completion_ids)} completion_ids"
            raise ValueError(f"RewardScorer.score: {n} examples, {len(completions)} completions{ids}; need one each")
        call = trl_call(examples, completions, completion_ids, trainer_state)
        per: dict[str, list[float]] = {}
        failures: dict[str, int] = {}
        errors = timeouts = 0
        messages: list[str] = []
        fallbacks: list[str] = []
        for k, (name, _) in enumerate(self.functions):
            results, why = self._score_function(k, name, call, n)
            if why is not None:
                fallbacks.append(f"{name}: {one_line(why)}")
            values, first = [], None
            failures[name] = 0
            for value, problem, timed_out in results:
                if problem is not None:
                    timeouts += timed_out
                    errors += not timed_out
                    failures[name] += 1
                    first = first or problem
                    if len(messages) < 3:
                        messages.append(f"{name}: {one_line(problem)}")
                values.append(value)
            per[name] = values
            stop = self.budget.record(name, failures[name], n, first)
            if stop is not None:
                raise RewardFunctionError(stop)
        total = [sum(w * per[name][i] for w, name in zip(self.weights, self.names)) for i in range(n)]
        correct = [v >= CORRECT_AT for v in per[self.names[0]]] if self.names else [False] * n
        return Scores(total, per, correct, errors, timeouts, messages, failures, fallbacks)

    def _score_function(self, k: int, name: str, call, n: int):
        """[(score, problem | None, timed_out)] per completion for function k, and why the batch call was not
        used (None when it was): one batch call under timeout_s * n, else one call per completion."""
        if n == 0:
            return [], None
        (outcome,) = self.worker.map(k, [call], timeout_s=self.worker.timeout_s * n)
        if n > 1:
            scores, why = batch_scores(outcome, n)
            if scores is not None:
                return [(value, problem, False) for value, problem in scores], None
            outcomes = self.worker.map(k, split_call(call, n))
        else:
            why, outcomes = None, [outcome]  # a one-completion batch is its own fallback
        return [(*as_score(name, o), o.timed_out) for o in outcomes], why

    def close(self) -> None:
        self.worker.close()


def _as_list(value: Any) -> list | None:
    """A function's result as a list (numpy arrays and tuples included), or None when it is not one."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):  # a numpy array
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else None


def batch_scores(outcome, n: int) -> tuple[list[tuple[float, str | None]] | None, str | None]:
    """([(score, problem)] per completion, None) from a batch call's outcome, or (None, why) when the call
    raised, ran over, or did not return a list of ``n`` scores (then the batch is scored one by one)."""
    if not outcome.ok:
        return None, f"batch call failed ({outcome.error})"
    value = _as_list(outcome.value)
    if value is None:
        return None, f"batch call returned {type(outcome.value).__name__}, not a list of {n} scores"
    if len(value) != n:
        return None, f"batch call returned {len(value)} score(s) for {n} completions"
    return [element_score(v) for v in value], None


def as_score(name: str, outcome, expected: int = 1) -> tuple[float, str | None]:
    """(score, problem) of one call's outcome: the score when it returned a list of ``expected``
    finite numbers (None counts as 0, no problem), else 0 and the problem (a raise, a timeout, a
    non-number, NaN or inf). A result of the wrong length or not a list raises RewardFunctionError:
    that is a programming error, not a per-sample failure."""
    if not outcome.ok:
        return 0.0, outcome.error
    value = _as_list(outcome.value)
    if value is None:
        raise RewardFunctionError(
            f"reward function {name!r} returned {type(outcome.value).__name__} "
            f"{one_line(repr(outcome.value), 40)}, not a list of scores; "
            f"it must return one score per completion (expected a list of length {expected})"
        )
    if len(value) != expected:
        raise RewardFunctionError(
            f"reward function {name!r} returned {len(value)} score(s) for {expected} completion(s); "
            f"it must return one score per completion (expected length {expected}, got {len(value)})"
        )
    return element_score(value[0])


def element_score(v: Any) -> tuple[float, str | None]:
    """(score, problem) of one returned score: None -> 0 (no problem, as in TRL); a bool or finite
    number -> itself; anything else -> 0 and the problem."""
    if v is None:
        return 0.0, None
    if isinstance(v, bool):
        return float(v), None
    try:
        x = float(v)
    except (TypeError, ValueError, OverflowError):
        return 0.0, f"ValueError: score {one_line(repr(v), 40)} is not a number"
    if not math.isfinite(x):
        return 0.0, f"ValueError: score {x} is not finite"
    return x, None
