"""The Geometry3K / MathVista-style loader (task.name=image_dataset) on a small local fixture."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from mhpo.models.multimodal import load_image
from mhpo.tasks import build_task
from mhpo.tasks.image_datasets import ARGS, canonical_answer, choice_prompt, examples_from_rows
from mhpo.trainer.config import load_config

FIXTURE = Path(__file__).parent / "fixtures" / "visual_qa"


def _write_images(folder: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_images", FIXTURE / "make_images.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.write_images(folder)


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    """rows.jsonl next to freshly drawn images/ (paths in the file are relative to it)."""
    shutil.copy(FIXTURE / "rows.jsonl", tmp_path / "rows.jsonl")
    _write_images(tmp_path / "images")
    return tmp_path


def _task(path, *overrides):
    return build_task(load_config(None, ["task.name=image_dataset", f"task.path={path}", *overrides]).task)


def test_fixture_rows_become_prompts_with_choices_and_canonical_answers(data_dir, monkeypatch):
    monkeypatch.chdir(data_dir.parent)  # relative image paths must resolve against the JSONL, not the cwd
    t = _task(data_dir / "rows.jsonl")
    rows = {e.columns["id"]: e for e in t.heldout(3, 0) + t.train_source(0, frozenset()).next(4)}
    g1, g2, m1, m2 = rows["g1"], rows["g2"], rows["m1"], rows["m2"]
    assert (
        g1.prompt == "How many triangles are in the figure?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer with the option's letter."
    )
    assert (g1.answer, g2.answer, m1.answer, m2.answer) == ("B", "C", "5", "A")  # letter, value, free-form, "(a)"
    assert m1.prompt == "What is the height of the tallest bar?"  # no choices: the question alone
    for ex in (g1, g2, m1, m2):
        assert Path(ex.columns["image"]).is_absolute() and Path(ex.columns["image"]).is_file()
        assert load_image(ex.columns["image"]).size == (56, 56)
    assert g1.key != m2.key  # same image, different question
    assert t.reward == "exact_match"


def test_images_as_bytes_dicts_pil_and_data_uris_are_accepted(data_dir):
    png = (data_dir / "images" / "bars.png").read_bytes()
    pil = Image.open(io.BytesIO(png))
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    rows = [
        (f"row {i}", {"image": img, "question": "Tallest bar?", "answer": "5"})
        for i, img in enumerate([png, {"bytes": png, "path": None}, pil, uri])
    ]
    out = examples_from_rows(rows, None, cols=ARGS, answer_column="answer")
    assert isinstance(out[0].columns["image"], bytes) and out[3].columns["image"] == png
    decoded = [load_image(e.columns["image"]) for e in out]
    assert all(im.tobytes() == decoded[0].tobytes() for im in decoded)


@pytest.mark.parametrize(
    "line,message",
    [
        (
            '{"image": "images/missing.png", "question": "Q?", "answer": "1"}',
            r"bad.jsonl:2: image 'images/missing.png' does not exist",
        ),
        (
            '{"image": "images/bars.png", "question": "Q?", "choices": ["1", "2"], "answer": "C"}',
            r"bad.jsonl:2: answer 'C' is neither a letter A-B nor one of the choices \['1', '2'\]",
        ),
        ('{"image": "images/bars.png", "answer": "1"}', r"bad.jsonl:2: column 'question' is missing"),
        (
            '{"image": "images/bars.png", "question": "", "answer": "1"}',
            r"bad.jsonl:2: column 'question' must be a non-empty string",
        ),
        ('{"image": "images/bars.png", "question": "Q?", "answer": " "}', r"bad.jsonl:2: the answer is empty"),
        (
            '{"image": "images/bars.png", "question": "Q?", "choices": "AB", "answer": "A"}',
            r"bad.jsonl:2: column 'choices' must be a list",
        ),
        (
            '{"image": 7, "question": "Q?", "answer": "1"}',
            r"bad.jsonl:2: the image must be a path, a data URI, bytes or a PIL image, got int",
        ),
        (
            '{"image": "data:image/png;base64,@@", "question": "Q?", "answer": "1"}',
            r"bad.jsonl:2: the image data URI holds invalid base64",
        ),
        (
            '{"image": "images/bars.png", "question": "Q?"',
            r"bad.jsonl:2:46: not valid JSON \(Expecting .,. delimiter\)",
        ),
        ('["images/bars.png", "Q?", "1"]', r"bad.jsonl:2: a row must be a JSON object, got list"),
    ],
)
def test_bad_rows_name_the_line_and_the_problem(data_dir, line, message):
    good = json.dumps({"image": "images/bars.png", "question": "Q?", "answer": "1"})
    (data_dir / "bad.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        _task(data_dir / "bad.jsonl")


def test_column_names_and_instruction_come_from_task_args(data_dir):
    rows = [{"img": "images/bars.png", "problem": "Find x.", "options": ["3", "4"], "label": "4"}]
    (data_dir / "geo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    t = _task(
        data_dir / "geo.jsonl",
        "task.args.question_column=problem",
        "task.args.choices_column=options",
        "task.args.image_column=img",
        "task.answer_column=label",
        "task.args.instruction=Letter?",
    )
    ex = t.heldout(1, 0)[0]
    assert ex.prompt == "Find x.\nA. 3\nB. 4\nLetter?" and ex.answer == "B"
    with pytest.raises(ValueError, match="unknown argument 'question'; valid arguments: question_column"):
        _task(data_dir / "geo.jsonl", "task.args.question=problem")


def test_missing_file_and_heldout_too_large(data_dir):
    with pytest.raises(ValueError, match="does not exist"):
        _task(data_dir / "nope.jsonl")
    with pytest.raises(ValueError, match="eval.size=4 is too large"):
        _task(data_dir / "rows.jsonl").heldout(4, 0)


def test_canonical_answer_and_prompt_are_pure():
    assert canonical_answer("b.", ["x", "y"]) == "B" and canonical_answer(" y ", ["x", "y"]) == "B"
    assert canonical_answer(3.5, []) == "3.5"
    assert choice_prompt("Q", [], "ignored") == "Q"
    assert choice_prompt("Q", ["x"], "") == "Q\nA. x"
