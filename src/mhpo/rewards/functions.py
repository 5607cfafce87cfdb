"""Built-in reward functions, TRL's signature: ``f(prompts, completions, **columns) -> list[float]``.

Each scores a whole batch; a completion is a string or, for a conversational prompt, TRL's list of
messages ``[{"role": "assistant", "content": text}]`` (its last message's text is scored).

    exact_match     1 if completion.strip() == answer.strip() else 0
    last_number     1 if the last number in the completion equals the gold number (lm-eval's
                    "flexible-extract" for GSM8K), else 0
    math_verify     1 if math-verify judges the completion's final answer equal to the gold answer.
                    math-verify evaluates arithmetic: a reply that restates the question, "2 + 6",
                    parses to 8 and scores 1 against the gold 8. On tasks whose prompt holds the
                    expression to evaluate (chat_addition) a policy learns exactly that; use
                    last_number there.
    reasoning_gym   the reasoning-gym dataset's own score_answer(answer, entry), in [0, 1]; the
                    answer is the last <answer>...</answer> span if there is one, else the stripped
                    completion

This file is loaded by path inside the timeout worker (see :mod:`mhpo.rewards.timeout_worker`), so it imports
nothing from the ``mhpo`` package and nothing heavy at top level.
"""

from __future__ import annotations

import atexit
import contextlib
import re
import shutil
import tempfile
from decimal import Decimal, InvalidOperation
from functools import cache, lru_cache


def completion_text(completion) -> str:
    """The text of a completion: the string itself, or the content of the last message of a
    conversational completion (content as a string or as a list of {"type": "text", "text": ...} parts)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, (list, tuple)):
            return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
        return str(content)
    return str(completion)


def exact_match(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the stripped completion equals the stripped answer, else 0.0."""
    return [float(completion_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]


_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?|(?<=\w)\d[\d,]*(?:\.\d+)?")


def _last_number(text: str) -> Decimal | None:
    """The last number in ``text`` ("-3", "1,024", "2.50"; a minus sign only where no word or digit
    precedes it, so "5-3" ends in 3), or None."""
    found = _NUMBER.findall(text)
    return Decimal(found[-1].replace(",", "")) if found else None


def last_number(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the last number in the completion equals the gold number (so "4 + 7 = 11" and
    "\\boxed{11}" score 1, the restated "4 + 7" scores 0); ValueError on a gold that is not a number."""
    out = []
    for c, a in zip(completions, answer):
        try:
            gold = Decimal(str(a).strip().replace(",", ""))
        except InvalidOperation:
            raise ValueError(
                f"last_number: gold answer {a!r} is not a number; use exact_match or math_verify"
            ) from None
        out.append(float(_last_number(completion_text(c)) == gold))
    return out


def _gold(answer: str):
    from math_verify import parse

    text = str(answer).strip()
    if "$" not in text and "\\boxed" not in text:
        parsed = parse(f"${text}$")
        if parsed:
            return parsed
    return parse(text)


def math_verify(prompts, completions, answer, **_) -> list[float]:
    """1.0 when math-verify finds the completion's final answer equal to the gold answer."""
    from math_verify import parse, verify

    return [float(bool(verify(_gold(a), parse(completion_text(c))))) for c, a in zip(completions, answer)]


math_verify.__mhpo_preload__ = ("math_verify",)


@lru_cache(maxsize=1)
def _scratch() -> str:
    path = tempfile.mkdtemp(prefix="mhpo-rg-score-")
    atexit.register(shutil.rmtree, path, True)
    return path


@cache
def _rg_scorer(name: str):
    import reasoning_gym

    with contextlib.chdir(_scratch()):
        return reasoning_gym.get_score_answer_fn(name)


def reasoning_gym(prompts, completions, entry, **_) -> list[float]:
    """score_answer of the row's reasoning-gym dataset on the <answer> span (or whole completion)."""
    from reasoning_gym.utils import extract_answer

    out = []
    for c, e in zip(completions, entry):
        raw = completion_text(c)
        text = extract_answer(raw)
        text = raw.strip() if text is None else text
        with contextlib.chdir(_scratch()):
            out.append(float(_rg_scorer(e["metadata"]["source_dataset"])(answer=text, entry=e)))
    return out


reasoning_gym.__mhpo_preload__ = ("reasoning_gym",)
