"""Named evaluation benchmarks: hub id, split, columns, and how the gold answer is read.

    math500     HuggingFaceH4/MATH-500        test      problem, answer, unique_id
    aime24      HuggingFaceH4/aime_2024       train     problem, answer, id
    aime25      MathArena/aime_2025           train     problem, answer (int), problem_idx
    amc23       math-ai/amc23                 test      question, answer, id
    hmmt25      MathArena/hmmt_feb_2025       train     problem, answer, problem_idx
    gsm8k       openai/gsm8k (config main)    test      question, answer (gold after '#### ')
    geometry3k  hiyouga/geometry3k            test      images, problem, answer          (images)
    mathvista   AI4Math/MathVista             testmini  decoded_image, question, choices, answer, pid

(from ``shared/reference/EVALUATION.md``; hub cards change, so every column can be overridden).
A local JSONL / Parquet file or a saved dataset directory is a benchmark too (:func:`local_spec`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Gold answers and problem texts: small named transforms, chosen per benchmark.

GOLD_PARSERS: dict[str, Callable[[object], str]] = {}
PROBLEM_CLEANERS: dict[str, Callable[[str], str]] = {}


def gold_parser(name: str):
    """Register ``fn(raw gold) -> gold text`` under ``name`` (BenchmarkSpec.gold)."""

    def register(fn):
        GOLD_PARSERS[name] = fn
        return fn

    return register


def problem_cleaner(name: str):
    """Register ``fn(problem text) -> text`` under ``name`` (BenchmarkSpec.clean)."""

    def register(fn):
        PROBLEM_CLEANERS[name] = fn
        return fn

    return register


@gold_parser("plain")
def plain_gold(raw) -> str:
    """str(raw).strip() (MathArena's integer answers become '204')."""
    return "" if raw is None else str(raw).strip()


@gold_parser("after_hashes")
def gsm8k_gold(raw) -> str:
    """GSM8K: the text after the last '#### ', without thousands separators ('1,200' -> '1200')."""
    text = plain_gold(raw)
    return text.rpartition("####")[2].strip().replace(",", "")


@problem_cleaner("plain")
def plain_problem(text: str) -> str:
    return text.strip()


@problem_cleaner("strip_image_tags")
def strip_image_tags(text: str) -> str:
    """Geometry3K's problems start with '<image>': the image goes in as a real image instead."""
    return re.sub(r"\s*<image>\s*", " ", text).strip()


# ---------------------------------------------------------------------------------------------
# Specs.


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark's rows come from and which columns hold what.

    ``hub_id`` (+ ``config``, ``split``) for a named benchmark; ``path`` for a local one. The
    ``id_column`` is optional (missing: the row index is the id); the problem and answer columns
    are required; ``image_column`` / ``choices_column`` are read when set.
    """

    name: str
    label: str  # column header of summary.md (the paper's spelling)
    split: str
    hub_id: str | None = None
    config: str | None = None
    path: str | None = None
    problem_column: str = "problem"
    answer_column: str = "answer"
    id_column: str | None = None
    image_column: str | None = None
    choices_column: str | None = None
    gold: str = "plain"  # GOLD_PARSERS key
    clean: str = "plain"  # PROBLEM_CLEANERS key
    vision: bool = False

    @property
    def source(self) -> str:
        if self.path is not None:
            return self.path
        return f"{self.hub_id}" + (f" ({self.config})" if self.config else "") + f" [{self.split}]"


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("math500", "MATH500", "test", "HuggingFaceH4/MATH-500", id_column="unique_id"),
        BenchmarkSpec("aime24", "AIME24", "train", "HuggingFaceH4/aime_2024", id_column="id"),
        BenchmarkSpec("aime25", "AIME25", "train", "MathArena/aime_2025", id_column="problem_idx"),
        BenchmarkSpec("amc23", "AMC23", "test", "math-ai/amc23", problem_column="question", id_column="id"),
        BenchmarkSpec("hmmt25", "HMMT25", "train", "MathArena/hmmt_feb_2025", id_column="problem_idx"),
        BenchmarkSpec(
            "gsm8k", "GSM8K", "test", "openai/gsm8k", config="main", problem_column="question", gold="after_hashes"
        ),
        BenchmarkSpec(
            "geometry3k",
            "Geometry3K",
            "test",
            "hiyouga/geometry3k",
            image_column="images",
            clean="strip_image_tags",
            vision=True,
        ),
        BenchmarkSpec(
            "mathvista",
            "MathVista",
            "testmini",
            "AI4Math/MathVista",
            problem_column="question",
            id_column="pid",
            image_column="decoded_image",
            choices_column="choices",
            vision=True,
        ),
    )
}
# The paper's table order (MHPO paper, Avg@32); other benchmarks follow in the order given.
PAPER_ORDER = ("math500", "hmmt25", "amc23", "aime25", "aime24")

# Column flags that may override a spec (mhpo eval --problem-column ... / eval.benchmark_columns).
COLUMN_FIELDS = ("problem_column", "answer_column", "id_column", "image_column", "choices_column")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def benchmark_names() -> list[str]:
    return list(BENCHMARKS)


def is_local(name: str) -> bool:
    """A local benchmark: an existing path, or a name ending in .jsonl / .json / .parquet."""
    return name.endswith(LOCAL_SUFFIXES) or name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def local_spec(path: str, split: str = "train") -> BenchmarkSpec:
    """The spec of a local file or saved dataset: named after the file's stem, default columns
    problem / answer / id (``problem`` falls back to ``question`` or ``prompt`` when absent, an
    absent ``id`` to the row index, see :func:`mhpo.evaluation.loading.resolve_columns`)."""
    stem = Path(path).name
    for suffix in LOCAL_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return BenchmarkSpec(stem or path, stem or path, split, path=path, problem_column="", id_column="id")


def get_spec(name: str, *, columns: dict | None = None, split: str | None = None) -> BenchmarkSpec:
    """The spec of a named benchmark or a local path, with column / split overrides applied.

    ValueError listing the names for anything else.
    """
    if name in BENCHMARKS:
        spec = BENCHMARKS[name]
    elif is_local(name):
        if not Path(name).expanduser().exists():
            raise ValueError(f"benchmark file {name!r} does not exist")
        spec = local_spec(name)
    else:
        from mhpo.errors import did_you_mean

        raise ValueError(
            f"unknown benchmark {name!r}{did_you_mean(name, BENCHMARKS)}; named benchmarks: "
            f"{', '.join(BENCHMARKS)} (or a local .jsonl / .parquet file or saved dataset directory)"
        )
    changes = {k: v for k, v in (columns or {}).items() if v is not None}
    unknown = set(changes) - set(COLUMN_FIELDS)
    if unknown:
        raise ValueError(f"unknown column option(s) {', '.join(sorted(unknown))}; valid: {', '.join(COLUMN_FIELDS)}")
    if split is not None:
        changes["split"] = split
    return replace(spec, **changes)


def split_names(text: str | list) -> list[str]:
    """'math500,aime24' or ['math500', 'aime24'] -> the list of names (blanks dropped, order kept,
    duplicates removed)."""
    items = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    return list(dict.fromkeys(t.strip() for t in items if t.strip()))
