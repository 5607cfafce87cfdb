"""The parent side of answer scoring: completions go to :func:`answers.score_completion` in the
project's hard-killed worker process (:class:`mhpo.rewards.timeout_worker.TimeoutWorker`).

A call that raises, hangs past ``timeout_s`` or kills the worker scores 0 with no answer and is
counted in ``errors`` / ``timeouts``; it never stops the evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mhpo.evaluation.answers import MODES

ANSWERS_FILE = Path(__file__).with_name("answers.py")


@dataclass(frozen=True)
class Judgement:
    answer: str | None  # the extracted answer text
    parsed: str | None  # its canonical form (the maj@k vote key); None = no parsable answer
    score: float
    error: str | None = None
    timed_out: bool = False


class AnswerScorer:
    """score(completions, golds, choices) -> one Judgement per completion, in order."""

    def __init__(self, mode: str = "boxed", timeout_s: float = 10.0):
        if mode not in MODES:
            raise ValueError(f"unknown answer extraction {mode!r}; valid: {', '.join(MODES)}")
        from mhpo.rewards.timeout_worker import TimeoutWorker

        self.mode = mode
        self.worker = TimeoutWorker([f"{ANSWERS_FILE}:score_completion"], timeout_s)
        self.errors = self.timeouts = 0

    def check(self) -> None:
        errors = self.worker.wait_loaded()
        if errors:
            raise ValueError(f"answer scorer: {errors[0]}")

    def score(
        self, completions: Sequence[str], golds: Sequence[str], choices: Sequence[Sequence[str]]
    ) -> list[Judgement]:
        calls = [
            ((c, g), {"mode": self.mode, "choices": list(ch) or None}) for c, g, ch in zip(completions, golds, choices)
        ]
        out = []
        for outcome in self.worker.map(0, calls):
            value = outcome.value if outcome.ok else None
            if not isinstance(value, dict):
                self.timeouts += outcome.timed_out
                self.errors += not outcome.timed_out
                out.append(Judgement(None, None, 0.0, outcome.error or f"bad result {value!r:.60}", outcome.timed_out))
                continue
            score = float(value.get("score") or 0.0)
            out.append(Judgement(value.get("answer"), value.get("parsed"), min(max(score, 0.0), 1.0)))
        return out

    def close(self) -> None:
        self.worker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
