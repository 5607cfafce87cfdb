"""Reward scoring: resolve ``rewards.functions``, run them in the sandbox, combine the scores.

Functions have TRL's signature ``f(prompts, completions, **columns) -> list[float]``: the built-ins
of :mod:`mhpo.reward_functions` (exact_match, math_verify, reasoning_gym), ``auto`` (the task's
verifier), or user functions named ``module:function`` / ``path/to/file.py:function``. Every
function is called once per completion (one-element lists) in a worker process with a hard time
limit (:mod:`mhpo.sandbox`), so a hang or an exception costs that completion only: it scores 0 and
is counted (``reward/errors``, ``reward/timeouts``).

    total_i = sum_j w_j f_j(i)              correct_i = f_0(i) >= 1   (the first function)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

_BUILTIN_FILE = Path(__file__).with_name("reward_functions.py")
BUILTIN: dict[str, str] = {name: f"{_BUILTIN_FILE}:{name}" for name in ("exact_match", "math_verify", "reasoning_gym")}
CORRECT_AT = 1.0 - 1e-6


# ---------------------------------------------------------------------------------------------
# Resolution and scoring (parent process).


def resolve(names: Sequence[str], task_reward: str) -> list[tuple[str, str]]:
    """(metric name, sandbox spec) per configured function; 'auto' is the task's verifier."""
    out = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"rewards.functions entries must be names or module:function specs, got {name!r}")
        name = task_reward if name == "auto" else name
        if name in BUILTIN:
            out.append((name, BUILTIN[name]))
            continue
        if ":" not in name:
            from .config import did_you_mean

            raise ValueError(
                f"unknown reward function {name!r}{did_you_mean(name, BUILTIN)}; valid: auto, {', '.join(BUILTIN)}, "
                "module:function, path/to/file.py:function"
            )
        from .sandbox import split_spec

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


@dataclass
class Scores:
    """Scores of one batch of completions (all lists have one entry per completion)."""

    total: list[float]
    per_function: dict[str, list[float]]
    correct: list[bool]
    errors: int = 0
    timeouts: int = 0
    messages: list[str] = field(default_factory=list)  # the first few error messages


class RewardScorer:
    """Weighted sum of reward functions, each called per completion in the sandbox."""

    def __init__(self, names: Sequence[str], task_reward: str, weights: Sequence[float] | None, timeout_s: float):
        self.functions = resolve(names, task_reward)
        if weights is None:
            weights = [1.0] * len(self.functions)
        if len(weights) != len(self.functions) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights
        ):
            raise ValueError(
                f"rewards.weights={list(weights)!r} must be {len(self.functions)} finite number(s), one per function"
            )
        self.weights = [float(w) for w in weights]
        from .sandbox import Sandbox

        self.sandbox = Sandbox([spec for _, spec in self.functions], timeout_s)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.functions]

    def check(self) -> None:
        """Wait for the worker to import every function; ValueError naming the first that failed."""
        errors = self.sandbox.wait_loaded()
        if errors:
            raise ValueError(f"reward function {errors[0]}")

    def score(self, examples: Sequence[Any], completions: Sequence[str]) -> Scores:
        """Score completion i against examples[i] (an Example: prompt, answer, columns)."""
        calls = [
            (([ex.prompt], [c]), {**{k: [v] for k, v in ex.columns.items()}, "answer": [ex.answer]})
            for ex, c in zip(examples, completions)
        ]
        per: dict[str, list[float]] = {}
        errors = timeouts = 0
        messages: list[str] = []
        for k, (name, _) in enumerate(self.functions):
            values = []
            for outcome in self.sandbox.map(k, calls):
                value, problem = _as_score(outcome)
                if problem is not None:
                    timeouts += outcome.timed_out
                    errors += not outcome.timed_out
                    if len(messages) < 3:
                        messages.append(f"{name}: {problem}")
                values.append(value)
            per[name] = values
        total = [sum(w * per[n][i] for w, n in zip(self.weights, self.names)) for i in range(len(calls))]
        correct = [v >= CORRECT_AT for v in per[self.names[0]]]
        return Scores(total, per, correct, errors, timeouts, messages)

    def close(self) -> None:
        self.sandbox.close()


def _as_score(outcome) -> tuple[float, str | None]:
    """(score, problem): 0 with a reason unless the call returned one finite number (None = 0)."""
    if not outcome.ok:
        return 0.0, outcome.error
    value = outcome.value
    if not isinstance(value, (list, tuple)) or len(value) != 1:
        return 0.0, f"ValueError: must return a list with one score per completion, got {value!r:.80}"
    v = value[0]
    if v is None:
        return 0.0, None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return 0.0, f"ValueError: score {value[0]!r:.40} is not a number"
    if not math.isfinite(v):
        return 0.0, f"ValueError: score {v} is not finite"
    return v, None
