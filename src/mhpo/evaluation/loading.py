"""Benchmark rows -> :class:`Problem` s: prompt (instruction template applied), gold, image, choices.

Rows come through ``datasets``: from the hub by id (named benchmarks), from ``data_dir/<name>``
when a local copy is there (a ``save_to_disk`` directory, ``<name>.jsonl`` or ``<name>.parquet``,
in the hub schema), or from a local file / saved dataset given as the benchmark itself.

The user turn of every problem is ``template`` with ``{problem}`` replaced by the problem text
(multiple-choice problems: the text, then one ``A. <option>`` line per option). The default is the
usual math instruction (:data:`DEFAULT_TEMPLATE`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mhpo.evaluation.specs import GOLD_PARSERS, PROBLEM_CLEANERS, BenchmarkSpec
from mhpo.tasks.base import Example

DEFAULT_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."
PLACEHOLDER = "{problem}"
LOCAL_PROBLEM_COLUMNS = ("problem", "question", "prompt")  # tried in order for local files


@dataclass(frozen=True)
class Problem:
    """One benchmark problem. ``example.prompt`` is the user turn; ``example.answer`` the gold
    (a letter for multiple choice); ``example.columns`` holds ``image`` and ``choices`` when set."""

    benchmark: str
    id: str
    example: Example

    @property
    def gold(self) -> str:
        return self.example.answer

    @property
    def choices(self) -> list[str]:
        return list(self.example.columns.get("choices") or [])


def apply_template(template: str, problem: str) -> str:
    """``template`` with every ``{problem}`` replaced (no str.format: ``\\boxed{}`` stays as is)."""
    if PLACEHOLDER not in template:
        raise ValueError(f"the prompt template must contain {PLACEHOLDER}, got {template!r:.80}")
    return template.replace(PLACEHOLDER, problem)


# ---------------------------------------------------------------------------------------------
# Rows.


def local_copy(spec: BenchmarkSpec, data_dir: str | None) -> str | None:
    """``data_dir/<name>`` (a directory), ``<name>.jsonl`` or ``<name>.parquet`` if one exists."""
    if not data_dir or spec.path is not None:
        return None
    root = Path(data_dir).expanduser()
    for candidate in (root / spec.name, root / f"{spec.name}.jsonl", root / f"{spec.name}.parquet"):
        if candidate.exists():
            return str(candidate)
    return None


def load_dataset_rows(spec: BenchmarkSpec, data_dir: str | None = None):
    """(datasets.Dataset, root for relative image paths or None); ValueError with one line."""
    path = spec.path or local_copy(spec, data_dir)
    if path is not None:
        from mhpo.tasks.datasets import load_split

        p = Path(path).expanduser()
        try:
            data = load_split(path, "train" if p.is_file() else spec.split)
        except ValueError as err:
            raise ValueError(f"benchmark {spec.name!r}: {str(err).replace('task.path ', '', 1)}") from None
        return data, (p.parent if p.is_file() else p)
    import datasets

    datasets.utils.logging.disable_progress_bar()
    if not datasets.config.HF_HUB_OFFLINE and not hub_reachable():
        raise ValueError(
            f"benchmark {spec.name!r}: the Hugging Face hub is not reachable to fetch {spec.source}; offline, put a "
            "copy in the hub schema under --data-dir (or set HF_HUB_OFFLINE=1 to read the hub cache)"
        )
    try:
        return datasets.load_dataset(spec.hub_id, spec.config, split=spec.split), None
    except Exception as err:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"benchmark {spec.name!r}: {spec.source} could not be loaded ({type(err).__name__}: {first:.200}); "
            "offline, put a copy in the hub schema under --data-dir"
        ) from None


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's endpoint (HF_ENDPOINT) opens within ``timeout_s``: one try,
    so that an offline machine fails at once instead of after the download client's retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s).close()
        return True
    except OSError:
        return False


def resolve_columns(spec: BenchmarkSpec, columns: Sequence[str]) -> BenchmarkSpec:
    """The spec with its problem column settled (local files: the first of problem / question /
    prompt present), checked against ``columns``: ValueError naming a missing column and the
    columns present. A named ``id_column`` that is absent falls back to the row index."""
    cols = list(columns)
    if not spec.problem_column:
        found = next((c for c in LOCAL_PROBLEM_COLUMNS if c in cols), None)
        if found is None:
            raise ValueError(
                f"benchmark {spec.name!r}: no problem column (tried {', '.join(LOCAL_PROBLEM_COLUMNS)}; "
                f"set --problem-column); columns: {', '.join(cols)}"
            )
        spec = replace(spec, problem_column=found)
    for key in ("problem_column", "answer_column", "image_column", "choices_column"):
        col = getattr(spec, key)
        if col and col not in cols:
            raise ValueError(f"benchmark {spec.name!r}: column {col!r} ({key}) is missing; columns: {', '.join(cols)}")
    if spec.id_column and spec.id_column not in cols:
        spec = replace(spec, id_column=None)
    return spec


def row_to_problem(spec: BenchmarkSpec, row: dict, index: int, template: str, root: Path | None) -> Problem:
    """One row -> Problem (ValueError on an empty problem / gold or an unusable image)."""
    from mhpo.tasks.image_datasets import canonical_answer, check_image, choice_prompt

    text = row[spec.problem_column]
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"column {spec.problem_column!r} must be a non-empty string, got {text!r:.60}")
    text = PROBLEM_CLEANERS[spec.clean](text)
    choices = row.get(spec.choices_column) if spec.choices_column else None
    choices = [str(c) for c in choices] if isinstance(choices, (list, tuple)) and choices else []
    gold = GOLD_PARSERS[spec.gold](row[spec.answer_column])
    if not gold:
        raise ValueError(f"column {spec.answer_column!r} is empty")
    columns: dict[str, Any] = {"problem": text}
    if choices:
        gold = canonical_answer(gold, choices)
        text = choice_prompt(text, choices, "")
        columns["choices"] = choices
    if spec.image_column:
        value = row[spec.image_column]
        images = (
            [check_image(v, root) for v in value] if isinstance(value, (list, tuple)) else [check_image(value, root)]
        )
        if not images:
            raise ValueError(f"column {spec.image_column!r} holds no image")
        columns["image"] = images if len(images) > 1 else images[0]
    pid = row.get(spec.id_column) if spec.id_column else None
    return Problem(
        spec.name, str(index if pid is None else pid), Example(apply_template(template, text), gold, columns)
    )


def load_problems(
    spec: BenchmarkSpec, *, template: str, data_dir: str | None = None, limit: int | None = None
) -> list[Problem]:
    """The first ``limit`` (default all) problems of a benchmark, ids made unique ('id#2', ...)."""
    apply_template(template, "")  # check the template before loading anything
    data, root = load_dataset_rows(spec, data_dir)
    spec = resolve_columns(spec, data.column_names)
    n = len(data) if limit is None else min(limit, len(data))
    if n == 0:
        raise ValueError(f"benchmark {spec.name!r} has no rows")
    out, seen = [], {}
    for i in range(n):
        try:
            problem = row_to_problem(spec, dict(data[i]), i, template, root)
        except ValueError as err:
            where = data.where(i) if hasattr(data, "where") else f"row {i}"
            raise ValueError(f"benchmark {spec.name!r} ({where}): {err}") from None
        seen[problem.id] = seen.get(problem.id, 0) + 1
        if seen[problem.id] > 1:
            problem = replace(problem, id=f"{problem.id}#{seen[problem.id]}")
        out.append(problem)
    return out
