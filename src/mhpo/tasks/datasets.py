"""User data (``task.name: dataset``): JSONL, Parquet, a saved Hugging Face dataset, or a hub id.

Each row gives a prompt (``task.prompt_column``: a string or a list of chat messages) and a
reference answer (``task.answer_column``). Every other column is passed to reward functions by
name, as TRL does (``f(prompts, completions, **columns)``). The held-out set is ``eval.size`` rows
of ``task.eval_split`` when given, else of the training split; either way no held-out prompt is
ever drawn for training.

JSON files (``.jsonl``: one object per line; ``.json``: a list of objects, or one per line) are read
here, into memory, line by line, so that a bad line is named: ``data.jsonl:7:12: not valid JSON
(Expecting ',' delimiter)`` (file:line:character column). Parquet files, saved datasets and hub ids
go through ``datasets``. Every row is checked when the task is built, and a bad one raises
ValueError naming where it is (``data.jsonl:7`` or ``data.parquet [train] row 6``) and the column.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mhpo.tasks.base import Example, IndexSource, Task

DEFAULT_MAX_NEW_TOKENS = 256
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
JSON_SUFFIXES = (".jsonl", ".json")


class JsonRows:
    """Rows read from a JSON file, with the part of ``datasets.Dataset``'s interface used here:
    ``len``, ``rows[i]`` (a dict with every column, None where a row lacks one), ``column_names``
    (in order of first appearance) and ``where(i)`` ('file:line')."""

    def __init__(self, rows: list[tuple[str, dict]]):
        self._where = [w for w, _ in rows]
        self._rows = [r for _, r in rows]
        self.column_names = list(dict.fromkeys(k for r in self._rows for k in r))

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict:
        row = self._rows[i]
        return {k: row.get(k) for k in self.column_names}

    def raw(self, i: int) -> dict:
        """Row i as it was read (only the keys it has)."""
        return self._rows[i]

    def where(self, i: int) -> str:
        return self._where[i]


def _decode_lines(path: Path) -> Iterable[tuple[int, str]]:
    """(line number, text) of every line, decoded as UTF-8; ValueError 'file:line:col: not valid UTF-8'."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                col = len(raw[: err.start].decode("utf-8", errors="replace")) + 1
                raise ValueError(f"{path}:{n}:{col}: not valid UTF-8 (byte 0x{raw[err.start]:02x})") from None


def _json_error(where: str, err: json.JSONDecodeError) -> ValueError:
    return ValueError(f"{where}:{err.colno}: not valid JSON ({err.msg})")


def _object(where: str, row: Any) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    return row


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """('file:line', row) for every non-blank line of a JSON-lines file; ValueError naming the line
    and the character column of bad JSON, of a non-object line or of bytes that are not UTF-8."""
    path = Path(path)
    out = []
    for n, line in _decode_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            raise _json_error(where, err) from None
        except RecursionError:
            raise ValueError(f"{where}: not valid JSON (nested too deeply)") from None
        out.append((where, _object(where, row)))
    return out


def read_json_rows(path: Path) -> list[tuple[str, dict]]:
    """Rows of a .jsonl file, or of a .json file holding a list of objects (where = 'file row i')
    or one object per line; ValueError naming the line and column of the first problem."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    text = "".join(line for _, line in _decode_lines(path))
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several documents: JSON lines in a .json file
            return read_jsonl(path)
        raise ValueError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
    if isinstance(doc, dict):
        return [(f"{path}:1", doc)]
    if not isinstance(doc, list):
        raise ValueError(f"{path}: must hold a list of JSON objects or one object per line, got {type(doc).__name__}")
    return [(f"{path} row {i}", _object(f"{path} row {i}", row)) for i, row in enumerate(doc)]


def looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in FILE_BUILDERS or Path(path).exists()


def load_split(path: str, split: str):
    """The rows of one split: :class:`JsonRows` for a JSON file, else a ``datasets.Dataset``;
    ValueError with a one-line reason otherwise."""
    p = Path(path).expanduser()
    if looks_local(path) and not p.exists():
        raise ValueError(f"task.path {path!r} does not exist")
    if p.is_file():
        builder = FILE_BUILDERS.get(p.suffix)
        if builder is None:
            raise ValueError(f"task.path {path!r}: unsupported file type {p.suffix!r}; use .jsonl, .json or .parquet")
        if split != "train":
            raise ValueError(f"task.path {path!r} is a single file: its only split is 'train', not {split!r}")
        if p.suffix in JSON_SUFFIXES:
            try:
                return JsonRows(read_json_rows(p))
            except OSError as err:
                raise ValueError(
                    f"task.path {path!r} could not be read ({type(err).__name__}: {err.strerror or err})"
                ) from None
    import datasets

    datasets.utils.logging.disable_progress_bar()
    try:
        if p.is_file():
            return datasets.load_dataset("parquet", data_files=str(p), split="train")
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
            data = datasets.load_from_disk(str(p))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise ValueError(f"task.path {path!r} has no split {split!r}; splits: {', '.join(data)}")
                return data[split]
            return data
        return datasets.load_dataset(str(p) if p.is_dir() else path, split=split)
    except ValueError as err:
        if str(err).startswith("task.path"):
            raise
        raise ValueError(f"task.path {path!r} could not be loaded ({_first_line(err)})") from None
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ArrowInvalid, ...)
        raise ValueError(f"task.path {path!r} could not be loaded ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    """'Type: first line of the message' of an exception (or of its cause, when it has none)."""
    text = str(err).strip()
    if not text and err.__cause__ is not None:
        return _first_line(err.__cause__)
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def where_of(data, path: str, split: str) -> Callable[[int], str]:
    """i -> where row i is: 'file:line' for JSON rows, else 'path [split] row i'."""
    if isinstance(data, JsonRows):
        return data.where
    return lambda i: f"{path} [{split}] row {i}"


def _column(data, col: str) -> Iterable:
    """The values of one column, row by row."""
    if isinstance(data, JsonRows):
        return (data[i][col] for i in range(len(data)))
    return data[col]


def prompt_problem(value: Any) -> str | None:
    """Why ``value`` is not a prompt (a non-empty string, or a list of {role, content} messages), or None."""
    if isinstance(value, str):
        return None if value.strip() else "is empty"
    if isinstance(value, list) and value:
        for k, m in enumerate(value):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), (str, list))
            ):
                return f"message {k} must be a mapping with 'role' and 'content', got {m!r:.60}"
        return None
    return f"must hold a string or a list of chat messages, got {type(value).__name__} {value!r:.40}"


def check_columns(data, path: str, prompt_column: str, answer_column: str, split: str = "train") -> None:
    """ValueError when a column is missing, there are no rows, or a row's prompt is not a prompt;
    a row problem names the row ('data.jsonl:7: column 'prompt' is empty')."""
    cols = list(data.column_names)
    for key, col in (("task.prompt_column", prompt_column), ("task.answer_column", answer_column)):
        if col not in cols:
            raise ValueError(f"{key} {col!r} is not a column of {path!r}; columns: {', '.join(map(str, cols))}")
    if len(data) == 0:
        raise ValueError(f"task.path {path!r} has no rows")
    where = where_of(data, path, split)
    for i, value in enumerate(_column(data, prompt_column)):
        problem = prompt_problem(value)
        if problem is not None:
            raise ValueError(f"{where(i)}: column {prompt_column!r} {problem}")
    if isinstance(data, JsonRows):  # a JSON row may lack a column that other rows have
        for i in range(len(data)):
            row = data.raw(i)
            if answer_column not in row:
                raise ValueError(
                    f"{where(i)}: column {answer_column!r} is missing (columns: {', '.join(map(str, row))})"
                )


def row_to_example(row: dict[str, Any], prompt_column: str, answer_column: str) -> Example:
    columns = {k: v for k, v in row.items() if k != prompt_column}
    answer = row[answer_column]
    answer = "" if answer is None else str(answer)
    columns["answer"] = answer
    return Example(row[prompt_column], answer, columns)


def build_dataset_task(path: str, prompt_column: str, answer_column: str, split: str, eval_split: str | None) -> Task:
    train = load_split(path, split)
    check_columns(train, path, prompt_column, answer_column, split)
    held = train
    if eval_split is not None:
        held = load_split(path, eval_split)
        check_columns(held, path, prompt_column, answer_column, eval_split)

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
            raise ValueError(
                f"eval.size={n} is too large for {path!r} ({len(held)} rows, {len(out)} distinct prompts available)"
            )
        return out

    def train_source(seed: int, exclude: frozenset[str]) -> IndexSource:
        return IndexSource(fetch_from(train), len(train), seed, exclude)

    return Task("dataset", "exact_match", DEFAULT_MAX_NEW_TOKENS, train_source, heldout, f"rows of {path}")
