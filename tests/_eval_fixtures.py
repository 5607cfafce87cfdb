"""Local copies of the named benchmarks, in exactly their hub schemas (columns and types from
shared/reference/EVALUATION.md), in the formats a --data-dir may hold: parquet, jsonl and
``save_to_disk`` directories (a Dataset or a DatasetDict with the hub split)."""

from __future__ import annotations

import io
import json
from pathlib import Path

ADD = [(1, 2), (3, 4), (5, 6), (7, 8)]


def _png(color: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def rows() -> dict[str, list[dict]]:
    """name -> hub-schema rows (small; the answers of the first row are given per test)."""
    return {
        "math500": [
            {
                "problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?",
                "solution": "... $\\boxed{\\frac{3}{4}}$.",
                "answer": "\\frac{3}{4}",
                "subject": "Prealgebra",
                "level": 1,
                "unique_id": "test/prealgebra/1.json",
            },
            {
                "problem": "Compute $2^5$.",
                "solution": "$\\boxed{32}$",
                "answer": "32",
                "subject": "Algebra",
                "level": 1,
                "unique_id": "test/algebra/2.json",
            },
        ],
        "aime24": [
            {
                "id": 60,
                "problem": "Find the number of ...",
                "solution": "...",
                "answer": "204",
                "url": "https://x",
                "year": "2024",
            },
            {
                "id": 61,
                "problem": "Let p be ...",
                "solution": "...",
                "answer": "110",
                "url": "https://y",
                "year": "2024",
            },
        ],
        "aime25": [
            {"problem_idx": 1, "problem": "Find the sum of all bases b > 9 ...", "answer": 70},
            {"problem_idx": 2, "problem": "On triangle ABC ...", "answer": 588},
        ],
        "amc23": [
            {"id": 0, "question": "Cities A and B are 45 miles apart ...", "answer": 27.0},
            {"id": 1, "question": "Positive real numbers x and y ...", "answer": 36.0},
        ],
        "hmmt25": [
            {"problem_idx": 1, "problem": "Compute the sum ...", "answer": "\\frac{1}{2}"},
            {"problem_idx": 2, "problem": "Let a, b ...", "answer": "2\\sqrt{3}"},
        ],
        "gsm8k": [
            {"question": "Natalia sold clips to 48 friends ...", "answer": "Natalia sold 48/2 = 24 ...\n#### 72"},
            {"question": "A shop sells 1,200 pens ...", "answer": "...\n#### 1,200"},
        ],
        "geometry3k": [
            {"images": [_png("red")], "problem": "<image>Find x.", "answer": "3"},
            {"images": [_png("blue")], "problem": "<image>Find y in the figure.", "answer": "2\\sqrt{2}"},
        ],
        "mathvista": [
            {
                "pid": "1",
                "question": "Which shape is red?",
                "image": "images/1.jpg",
                "decoded_image": _png("red"),
                "choices": ["circle", "square", "triangle"],
                "unit": None,
                "precision": None,
                "answer": "square",
                "question_type": "multi_choice",
                "answer_type": "text",
                "query": "Hint: ... Which shape is red?",
            },
            {
                "pid": "2",
                "question": "How many dots are there?",
                "image": "images/2.jpg",
                "decoded_image": _png("blue"),
                "choices": None,
                "unit": None,
                "precision": None,
                "answer": "7",
                "question_type": "free_form",
                "answer_type": "integer",
                "query": "Hint: ... How many dots?",
            },
        ],
    }


FORMATS = {  # how each benchmark is stored under the data dir
    "math500": "parquet",
    "aime24": "jsonl",
    "aime25": "dataset",
    "amc23": "dataset_dict",
    "hmmt25": "parquet",
    "gsm8k": "jsonl",
    "geometry3k": "dataset_dict",
    "mathvista": "dataset_dict",
}


def dataset(name: str):
    """The hub-schema rows of ``name`` as a datasets.Dataset (images as Image features)."""
    import datasets

    data = datasets.Dataset.from_list(rows()[name])
    if name == "geometry3k":
        data = data.cast_column("images", datasets.Sequence(datasets.Image()))
    if name == "mathvista":
        data = data.cast_column("decoded_image", datasets.Image())
    return data


def write_data_dir(root: Path) -> Path:
    """Every named benchmark under ``root`` in its FORMATS entry; returns root."""
    import datasets

    from mhpo.evaluation.specs import BENCHMARKS

    root.mkdir(parents=True, exist_ok=True)
    for name, fmt in FORMATS.items():
        data = dataset(name)
        if fmt == "parquet":
            data.to_parquet(str(root / f"{name}.parquet"))
        elif fmt == "jsonl":
            (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows()[name]))
        elif fmt == "dataset":
            data.save_to_disk(str(root / name))
        else:
            datasets.DatasetDict({BENCHMARKS[name].split: data}).save_to_disk(str(root / name))
    return root


def write_addition(path: Path, pairs=ADD) -> Path:
    """A local JSONL benchmark in the simplest schema: id, problem, answer."""
    path.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "problem": f"{a}+{b}", "answer": str(a + b)}) + "\n"
            for i, (a, b) in enumerate(pairs)
        )
    )
    return path
