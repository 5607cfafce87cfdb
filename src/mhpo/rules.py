"""The range rules numbers are checked against, config keys and objective hparams alike:
rule -> (predicate, the text an error shows). ``config.py`` fields and ``HParam`` name a rule."""

from __future__ import annotations

from collections.abc import Callable

RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    ">0": (lambda v: v > 0, "> 0"),
    ">=0": (lambda v: v >= 0, ">= 0"),
    ">1": (lambda v: v > 1, "> 1"),
    ">=1": (lambda v: v >= 1, ">= 1"),
    ">=2": (lambda v: v >= 2, ">= 2"),
    "[0,1]": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "[0,1)": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "(0,1]": (lambda v: 0 < v <= 1, "in (0, 1]"),
}
