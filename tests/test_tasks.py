"""Tasks: procedural problems, reasoning-gym by name, and user data (JSONL / Parquet)."""

from __future__ import annotations

import json
import os

import pytest

from mhpo.tasks import build_task
from mhpo.trainer.config import TaskConfig


def _task(**kw):
    return build_task(TaskConfig(**kw))


def test_addition_is_fixed_width_zero_padded_and_correct():
    task = _task(name="addition", args={"digits": 3, "mixed_widths": False})
    assert task.reward == "exact_match" and task.max_new_tokens == 5
    for ex in task.train_source(0, frozenset()).next(200):
        a, b = ex.prompt[:-1].split("+")
        assert len(a) == len(b) == 3 and ex.prompt.endswith("=")
        assert ex.answer == f"{int(a) + int(b):04d}"


def test_mixed_widths_trains_on_short_operands_but_holds_out_full_width():
    task = _task(name="addition")  # mixed_widths is on by default
    train = task.train_source(0, frozenset()).next(2000)
    small = sum(int(ex.prompt[:3]) < 10 for ex in train) / len(train)
    assert small > 0.2  # width 1 drawn for a third of the operands
    held = task.heldout(500, 1)
    assert sum(int(ex.prompt[:3]) < 10 for ex in held) / len(held) < 0.05  # uniform over [0, 1000)


def test_heldout_is_fixed_distinct_and_never_in_training():
    task = _task(name="addition", args={"digits": 2})
    held = task.heldout(300, 7)
    assert held == task.heldout(300, 7)  # a pure function of (n, seed)
    keys = frozenset(ex.key for ex in held)
    assert len(keys) == 300
    drawn = task.train_source(3, keys).next(3000)
    assert not keys & {ex.key for ex in drawn}
    probe = task.heldout(100, 8, keys)
    assert not keys & {ex.key for ex in probe}


def test_prompt_source_state_resumes_the_same_stream():
    task = _task(name="reverse", args={"length": 4})
    a = task.train_source(5, frozenset())
    a.next(17)
    state = json.loads(json.dumps(a.state_dict()))  # JSON-able
    expected = a.next(20)
    b = task.train_source(5, frozenset())
    b.load_state_dict(state)
    assert b.next(20) == expected


def test_sort_and_reverse_answers():
    for ex in _task(name="sort").train_source(1, frozenset()).next(50):
        assert ex.answer == "".join(sorted(ex.prompt[:-1]))
    for ex in _task(name="reverse").train_source(1, frozenset()).next(50):
        assert ex.answer == ex.prompt[:-1][::-1]


def test_reasoning_gym_task_generates_offline_in_a_scratch_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = _task(name="rg:leg_counting", args={"min_animals": 2, "max_animals": 3}, train_size=50)
    assert task.reward == "reasoning_gym"
    held = task.heldout(10, 0)
    src = task.train_source(1, frozenset(ex.key for ex in held))
    rows = src.next(60)  # more than one epoch of the 50-row pool
    assert src.state_dict()["epoch"] == 1
    assert all(ex.columns["entry"]["metadata"]["source_dataset"] == "leg_counting" for ex in rows)
    assert all(ex.answer == str(ex.columns["entry"]["answer"]) for ex in rows)
    assert os.listdir(tmp_path) == []  # nothing written into the working directory
    with pytest.raises(ValueError, match="unknown argument 'animals'"):
        _task(name="rg:leg_counting", args={"animals": 3})


def _rows(n):
    return [{"question": f"what is {i}+{i}?", "solution": str(2 * i), "level": i % 3} for i in range(n)]


def test_jsonl_dataset_task_passes_columns_and_holds_out_rows(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(40)))
    task = _task(name="dataset", path=str(path), prompt_column="question", answer_column="solution")
    held = task.heldout(10, 0)
    keys = frozenset(ex.key for ex in held)
    assert len(keys) == 10
    train = task.train_source(0, keys).next(30)
    assert len({ex.key for ex in train}) == 30 and not keys & {ex.key for ex in train}
    ex = train[0]
    assert ex.columns["answer"] == ex.answer == ex.columns["solution"]
    assert "level" in ex.columns and "question" not in ex.columns
    with pytest.raises(
        ValueError, match="task.prompt_column 'prompt' is not a column .* columns: question, solution, level"
    ):
        _task(name="dataset", path=str(path))
    with pytest.raises(ValueError, match="eval.size=50 is too large"):
        task.heldout(50, 0)


def test_parquet_dataset_task(tmp_path):
    import datasets

    path = tmp_path / "data.parquet"
    datasets.Dataset.from_list(_rows(12)).to_parquet(str(path))
    task = _task(name="dataset", path=str(path), prompt_column="question", answer_column="solution")
    assert len(task.train_source(0, frozenset()).next(12)) == 12
    csv = tmp_path / "data.csv"
    csv.write_text("question,solution\n1+1,2\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        _task(name="dataset", path=str(csv))


def test_saved_hf_dataset_with_an_eval_split(tmp_path):
    import datasets

    data = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(_rows(20)),
            "test": datasets.Dataset.from_list(
                [{"question": f"q{i}", "solution": str(i), "level": 0} for i in range(8)]
            ),
        }
    )
    data.save_to_disk(str(tmp_path / "ds"))
    task = _task(
        name="dataset", path=str(tmp_path / "ds"), prompt_column="question", answer_column="solution", eval_split="test"
    )
    held = task.heldout(8, 0)
    assert sorted(ex.prompt for ex in held) == sorted(f"q{i}" for i in range(8))
    assert len(task.train_source(0, frozenset()).next(20)) == 20
    with pytest.raises(ValueError, match="has no split 'dev'; splits: train, test"):
        _task(
            name="dataset",
            path=str(tmp_path / "ds"),
            prompt_column="question",
            answer_column="solution",
            eval_split="dev",
        )
