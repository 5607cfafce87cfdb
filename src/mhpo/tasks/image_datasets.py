"""Visual question rows (``task.name: image_dataset``): Geometry3K / MathVista-style JSONL and more.

One row per problem:

    {"image": "imgs/0001.png", "question": "Find x.", "choices": ["3", "4", "5", "6"], "answer": "B"}

    image     a path (relative paths are resolved against the JSONL file's folder), a
              "data:image/...;base64," string, or, from Parquet / saved Hugging Face datasets,
              bytes, an Image feature ({"bytes", "path"}) or a PIL image
    question  the question text (column ``task.args.question_column``, default "question")
    choices   optional list of options (``task.args.choices_column``, default "choices")
    answer    ``task.answer_column``: with choices, the option's letter ("B", "(b)", "b.") or the
              option's text ("4"); without choices, the reference value

The prompt is the question, then one line per option and an instruction:

    Find x.
    A. 3
    B. 4
    ...
    Answer with the option's letter.

and the reference answer of a multiple-choice row is the letter (so ``exact_match`` scores a bare
letter; a free-form row keeps its value, e.g. for ``rewards.functions=[math_verify]``). Every other
column is kept in ``Example.columns`` for reward functions. All rows are checked when the task is
built: a bad row raises ValueError naming the file, the line (or row) and the problem.
"""

from __future__ import annotations

import base64
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mhpo.tasks.base import Example, IndexSource, Task
from mhpo.tasks.datasets import DEFAULT_MAX_NEW_TOKENS, JsonRows, load_split, where_of

ARGS: dict[str, str] = {  # task.args of image_dataset: name -> default
    "question_column": "question",
    "choices_column": "choices",
    "image_column": "image",
    "instruction": "Answer with the option's letter.",
}
LETTERS = string.ascii_uppercase


def resolve_args(args: Mapping[str, Any]) -> dict[str, str]:
    """ARGS updated by ``args``; ValueError naming an unknown key or a non-string value."""
    out = dict(ARGS)
    for key, value in args.items():
        if key not in ARGS:
            raise ValueError(f"task 'image_dataset': unknown argument {key!r}; valid arguments: {', '.join(ARGS)}")
        if not isinstance(value, str):
            raise ValueError(f"task 'image_dataset': argument {key}={value!r} must be a string")
        out[key] = value
    return out


def choice_prompt(question: str, choices: Sequence[str], instruction: str) -> str:
    """The question, then 'A. <choice 0>' ... one per line, then the instruction (when choices)."""
    if not choices:
        return question
    lines = [question, *(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))]
    return "\n".join(lines + ([instruction] if instruction else []))


def canonical_answer(answer: Any, choices: Sequence[str]) -> str:
    """The reference answer: without choices the stripped value; with n choices a letter in A..,
    given as a letter ('B', 'b', '(B)', 'B.') or as the text of one option.

    Raises ValueError when the answer is empty or matches neither a letter nor an option.
    """
    text = "" if answer is None else str(answer).strip()
    if not text:
        raise ValueError("the answer is empty")
    if not choices:
        return text
    valid = LETTERS[: len(choices)]
    letter = text.strip("().: ").upper()
    if len(letter) == 1 and letter in valid:
        return letter
    for i, c in enumerate(choices):
        if text == str(c).strip():
            return LETTERS[i]
    raise ValueError(
        f"answer {text!r} is neither a letter {valid[0]}-{valid[-1]} nor one of the choices {list(choices)}"
    )


def check_image(value: Any, root: Path | None) -> Any:
    """The row's image, checked (not decoded): an existing path becomes absolute, a base64 data
    URI becomes bytes; bytes, {"bytes", "path"} dicts and PIL images are kept. ValueError otherwise."""
    if value is None:
        raise ValueError("the image is missing")
    if isinstance(value, str):
        if value.startswith("data:image/"):
            head, sep, data = value.partition(",")
            if not sep or not head.endswith(";base64"):
                raise ValueError("an image data URI must look like data:image/png;base64,<data>")
            try:
                return base64.b64decode(data, validate=True)
            except ValueError:
                raise ValueError("the image data URI holds invalid base64") from None
        path = Path(value).expanduser()
        if not path.is_absolute() and root is not None:
            path = root / path
        if not path.is_file():
            raise ValueError(f"image {value!r} does not exist (looked for {str(path)!r})")
        return str(path.resolve())
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not len(value):
            raise ValueError("the image bytes are empty")
        return bytes(value)
    if isinstance(value, Mapping) and (value.get("bytes") is not None or value.get("path") is not None):
        return dict(value)
    try:
        from PIL import Image

        if isinstance(value, Image.Image):
            return value
    except ImportError:  # pragma: no cover - Pillow is a dependency of the trainer
        pass
    raise ValueError(f"the image must be a path, a data URI, bytes or a PIL image, got {type(value).__name__}")


def _in_column(col: str, fn, *args):
    """fn(*args), with ' (column <col>)' added to a ValueError's message."""
    try:
        return fn(*args)
    except ValueError as err:
        raise ValueError(f"{err} (column {col!r})") from None


def row_to_example(row: Mapping[str, Any], cols: Mapping[str, str], answer_column: str, root: Path | None) -> Example:
    """One checked row -> Example(prompt, canonical answer, columns with the checked image)."""
    q_col, c_col, i_col = cols["question_column"], cols["choices_column"], cols["image_column"]
    for col in (q_col, answer_column, i_col):
        if col not in row:
            raise ValueError(f"column {col!r} is missing (columns: {', '.join(map(str, row))})")
    question = row[q_col]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"column {q_col!r} must be a non-empty string, got {question!r:.60}")
    choices = row.get(c_col)
    if choices is None:
        choices = []
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, (str, int, float)) for c in choices):
        raise ValueError(f"column {c_col!r} must be a list of strings, got {choices!r:.60}")
    if len(choices) > len(LETTERS):
        raise ValueError(f"column {c_col!r} has {len(choices)} choices; at most {len(LETTERS)}")
    choices = [str(c) for c in choices]
    answer = _in_column(answer_column, canonical_answer, row[answer_column], choices)
    image = _in_column(i_col, check_image, row[i_col], root)
    columns = {k: v for k, v in row.items() if k not in (q_col, i_col)}
    columns.update({"image": image, "question": question, "choices": choices, "answer": answer})
    return Example(choice_prompt(question, choices, cols["instruction"]), answer, columns)


def load_rows(path: str, split: str) -> tuple[list[tuple[str, dict]], Path | None]:
    """((where, row) list, image root): a JSON file read line by line (images relative to its
    folder; where = 'file:line'), anything else through :func:`mhpo.tasks.datasets.load_split`
    (where = 'path [split] row i')."""
    p = Path(path).expanduser()
    data = load_split(path, split)
    where = where_of(data, path, split)
    root = p.parent if p.is_file() else (p if p.is_dir() else None)
    try:
        get = data.raw if isinstance(data, JsonRows) else data.__getitem__
        return [(where(i), dict(get(i))) for i in range(len(data))], root
    except Exception as err:  # a damaged Arrow / Parquet file can fail only when its rows are read
        raise ValueError(
            f"task.path {path!r} could not be read ({type(err).__name__}: {str(err).strip()[:200]})"
        ) from None


def examples_from_rows(
    rows: Sequence[tuple[str, dict]], root: Path | None, *, cols: Mapping[str, str], answer_column: str
) -> list[Example]:
    """Every row as an Example; ValueError '<where>: <problem>' at the first bad row."""
    out = []
    for where, row in rows:
        try:
            out.append(row_to_example(row, cols, answer_column, root))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    if not out:
        raise ValueError("the dataset has no rows")
    return out


def build_image_dataset_task(cfg) -> Task:
    """The image_dataset task of a TaskConfig (path, split, eval_split, answer_column, args)."""
    cols = resolve_args(cfg.args)
    train = examples_from_rows(*load_rows(cfg.path, cfg.split), cols=cols, answer_column=cfg.answer_column)
    held = train
    if cfg.eval_split is not None:
        held = examples_from_rows(*load_rows(cfg.path, cfg.eval_split), cols=cols, answer_column=cfg.answer_column)

    def heldout(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[Example]:
        """n distinct rows in the order of permutation(seed), skipping keys in ``exclude``."""
        out, seen = [], set(exclude)
        for i in np.random.default_rng(seed).permutation(len(held)):
            ex = held[int(i)]
            if ex.key not in seen:
                seen.add(ex.key)
                out.append(ex)
                if len(out) == n:
                    break
        if len(out) < n or (cfg.eval_split is None and len(held) - n < 1):
            raise ValueError(
                f"eval.size={n} is too large for {cfg.path!r} ({len(held)} rows, {len(out)} distinct problems "
                "available)"
            )
        return out

    def train_source(seed: int, exclude: frozenset[str]) -> IndexSource:
        return IndexSource(lambda i: train[i], len(train), seed, exclude)

    return Task(
        "image_dataset", "exact_match", DEFAULT_MAX_NEW_TOKENS, train_source, heldout, f"visual questions of {cfg.path}"
    )
