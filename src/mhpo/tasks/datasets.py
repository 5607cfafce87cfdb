"""User data (``task.name: dataset``): JSONL, Parquet, a saved Hugging Face dataset, or a hub id.

Each row gives a prompt (``task.prompt_column``: a string or a list of chat messages) and a
reference answer (``task.answer_column``). Every other column is passed to reward functions by
name, as TRL does (``f(prompts, completions, **columns)``). The held-out set is ``eval.size`` rows
of ``task.eval_split`` when given, else of the training split; either way no held-out prompt is
ever drawn for training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .base import Example, IndexSource, Task

DEFAULT_MAX_NEW_TOKENS = 256
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in FILE_BUILDERS or Path(path).exists()


def load_split(path: str, split: str):
    """A ``datasets.Dataset`` for one split; ValueError with a one-line reason otherwise."""
    import datasets

    datasets.utils.logging.disable_progress_bar()
    p = Path(path).expanduser()
    if looks_local(path) and not p.exists():
        raise ValueError(f"task.path {path!r} does not exist")
    try:
        if p.is_file():
            builder = FILE_BUILDERS.get(p.suffix)
            if builder is None:
                raise ValueError(f"task.path {path!r}: unsupported file type {p.suffix!r}; use .jsonl, .json or .parquet")
            if split != "train":
                raise ValueError(f"task.path {path!r} is a single file: its only split is 'train', not {split!r}")
            return datasets.load_dataset(builder, data_files=str(p), split="train")
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
            data = datasets.load_from_disk(str(p))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise ValueError(f"task.path {path!r} has no split {split!r}; splits: {', '.join(data)}")
                return data[split]
            return data
        return datasets.load_dataset(str(p) if p.is_dir() else path, split=split)
    except ValueError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"task.path {path!r} could not be loaded ({type(err).__name__}: {first})") from None


def check_columns(data, path: str, prompt_column: str, answer_column: str) -> None:
    cols = list(data.column_names)
    for key, col in (("task.prompt_column", prompt_column), ("task.answer_column", answer_column)):
        if col not in cols:
            raise ValueError(f"{key} {col!r} is not a column of {path!r}; columns: {', '.join(cols)}")
    if len(data) == 0:
        raise ValueError(f"task.path {path!r} has no rows")
    first = data[0][prompt_column]
    if not (isinstance(first, str) or (isinstance(first, list) and all(isinstance(m, dict) for m in first))):
        raise ValueError(
            f"task.prompt_column {prompt_column!r} must hold strings or lists of chat messages; got {type(first).__name__}"
        )


def row_to_example(row: dict[str, Any], prompt_column: str, answer_column: str) -> Example:
    columns = {k: v for k, v in row.items() if k != prompt_column}
    answer = row[answer_column]
    answer = "" if answer is None else str(answer)
    columns["answer"] = answer
    return Example(row[prompt_column], answer, columns)


def build_dataset_task(
    path: str, prompt_column: str, answer_column: str, split: str, eval_split: str | None
) -> Task:
    train = load_split(path, split)
    check_columns(train, path, prompt_column, answer_column)
    held = train
    if eval_split is not None:
        held = load_split(path, eval_split)
        check_columns(held, path, prompt_column, answer_column)

    def fetch_from(data):
        return lambda i: row_to_example(data[i], prompt_column, answer_column)

    def heldout(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[Example]:
        """n distinct rows in the order of permutation(seed), skipping prompts in ``exclude``."""
        out, seen = [], set(exclude)
        for i in np.random.default_rng(seed).permutation(len(held)):
            ex = row_to_example(held[int(i)], prompt_column, answer_column)
            if ex.key not in seen:
                seen.add(ex.key)
                out.append(ex)
                if len(out) == n:
                    break
        spare = 0 if eval_split else 1  # without an eval split, rows must stay for training
        if len(out) < n or (not eval_split and len(held) - n < spare):
            raise ValueError(f"eval.size={n} is too large for {path!r} ({len(held)} rows, {len(out)} distinct prompts available)")
        return out

    def train_source(seed: int, exclude: frozenset[str]) -> IndexSource:
        return IndexSource(fetch_from(train), len(train), seed, exclude)

    return Task("dataset", "exact_match", DEFAULT_MAX_NEW_TOKENS, train_source, heldout, f"rows of {path}")
