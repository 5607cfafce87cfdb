"""Answer extraction and scoring of one completion, run inside the scorer worker process.

This file is loaded by path by :mod:`mhpo.rewards.timeout_worker` (like :mod:`mhpo.rewards.functions`, whose gold
parsing it reuses), so it imports nothing from the ``mhpo`` package and only the standard library
and math-verify. Calls run on the worker's main thread, where math-verify's signal-based timeouts
work, and the parent kills the worker if a call still runs past its hard limit.

Answer extraction (``mode``):

    boxed        the content of the LAST \\boxed{...} (or \\fbox{...}) of the completion; none: no
                 answer. The content is parsed by math-verify as \\boxed{content}.       (default)
    math-verify  math-verify's own extraction over the whole completion: the last \\boxed{} first,
                 then the last LaTeX expression, then the last plain number / expression (what
                 lighteval / open-r1 do; for small models that rarely box their answer)

A completion whose extraction finds nothing, or whose extracted text math-verify cannot parse,
has NO ANSWER: it scores 0 and does not vote in maj@k. Otherwise the score is
``verify(parse(gold), parse(answer))`` (gold wrapped in $...$ when bare, as the ``math_verify``
reward does). Multiple-choice problems (``choices`` given, gold a letter): the extracted text must
be one of the option letters ('B', '(B)', '\\text{B}') or the text of one option; the score is
letter == gold; in ``math-verify`` mode without a box, the last "answer is (X)" counts.
"""

from __future__ import annotations

import importlib.util
import re
import string
from functools import lru_cache
from pathlib import Path

MODES = ("boxed", "math-verify")
_BOX = re.compile(r"\\(?:boxed|fbox)\b")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*\(?\s*([A-Z])\s*\)?(?![A-Za-z])", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces matched), or of
    ``\\boxed X`` (up to whitespace or $); None when there is none or its braces never close."""
    matches = list(_BOX.finditer(text))
    for m in reversed(matches):
        rest = text[m.end() :]
        stripped = rest.lstrip()
        if stripped.startswith("{"):
            start = len(rest) - len(stripped) + 1
            depth = 1
            for j in range(start, len(rest)):
                ch = rest[j]
                depth += (ch == "{") - (ch == "}")
                if depth == 0:
                    return rest[start:j].strip()
            continue  # unbalanced: try an earlier box
        if rest[:1] == " ":
            token = re.match(r"\s+([^\s$]+)", rest)
            if token:
                return token.group(1).strip()
    return None


@lru_cache(maxsize=1)
def _reward_functions():
    """mhpo/rewards/functions.py loaded by path (no package import: it pulls in torch)."""
    path = Path(__file__).resolve().parent.parent / "rewards" / "functions.py"
    spec = importlib.util.spec_from_file_location("_mhpo_reward_functions_for_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=4096)
def _parsed_gold(gold: str):
    return _reward_functions()._gold(gold)


def canonical_key(parsed) -> str:
    """The vote key of a math-verify parse: str of its first (sympy) value, the right-hand side
    of an equation ('x = 5' and '5' vote together)."""
    value = parsed[0]
    rhs = getattr(value, "rhs", None)
    if rhs is not None and type(value).__name__ == "Equality":
        value = rhs
    return str(value)


def choice_letter(text: str, choices: list[str]) -> str | None:
    """'B', '(b)', 'B.', '\\text{B}' or the exact text of option B -> 'B'; None otherwise."""
    inner = re.sub(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", r"\1", text).strip()
    letter = inner.strip("().:$ ").upper()
    valid = string.ascii_uppercase[: len(choices)]
    if len(letter) == 1 and letter in valid:
        return letter
    for i, c in enumerate(choices):
        if inner == str(c).strip():
            return valid[i]
    return None


def score_completion(completion: str, gold: str, mode: str = "boxed", choices=None) -> dict:
    """{"answer": extracted text or None, "parsed": vote key or None, "score": 0.0 | 1.0}."""
    from math_verify import parse, verify

    if mode not in MODES:
        raise ValueError(f"unknown answer extraction {mode!r}; valid: {', '.join(MODES)}")
    text = str(completion)
    boxed = last_boxed(text)
    if choices:
        answer = boxed
        if answer is None and mode == "math-verify":
            hits = _ANSWER_IS.findall(text)
            answer = hits[-1] if hits else None
        letter = choice_letter(answer, list(choices)) if answer is not None else None
        return {"answer": answer, "parsed": letter, "score": float(letter is not None and letter == str(gold).strip())}
    if mode == "boxed":
        if boxed is None:
            return {"answer": None, "parsed": None, "score": 0.0}
        answer, pred = boxed, parse("\\boxed{" + boxed + "}")
    else:
        pred = parse(text)
        answer = (boxed if boxed else str(pred[-1])) if pred else boxed  # an empty box: what math-verify found
    if not pred:
        return {"answer": answer, "parsed": None, "score": 0.0}
    return {
        "answer": answer,
        "parsed": canonical_key(pred),
        "score": float(bool(verify(_parsed_gold(str(gold)), pred))),
    }


score_completion.__mhpo_preload__ = ("math_verify",)
