"""Named benchmarks load from local copies in their hub schemas (and from the hub by id), local
files take column flags, and bad input gives one clear error."""

from __future__ import annotations

import json

import pytest

from _eval_fixtures import FORMATS, dataset, rows, write_addition, write_data_dir
from mhpo.evaluation import BENCHMARKS, DEFAULT_TEMPLATE, get_spec, load_problems
from mhpo.evaluation.scoring import AnswerScorer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data_dir(tmp_path_factory.mktemp("bench-data"))


EXPECTED = {  # name -> (ids, golds) of the fixture rows
    "math500": (["test/prealgebra/1.json", "test/algebra/2.json"], ["\\frac{3}{4}", "32"]),
    "aime24": (["60", "61"], ["204", "110"]),
    "aime25": (["1", "2"], ["70", "588"]),
    "amc23": (["0", "1"], ["27.0", "36.0"]),
    "hmmt25": (["1", "2"], ["\\frac{1}{2}", "2\\sqrt{3}"]),
    "gsm8k": (["0", "1"], ["72", "1200"]),  # after '#### ', thousands separator dropped
    "geometry3k": (["0", "1"], ["3", "2\\sqrt{2}"]),
    "mathvista": (["1", "2"], ["B", "7"]),  # multiple choice: the option's letter
}


def test_every_named_benchmark_has_a_fixture():
    assert set(FORMATS) == set(BENCHMARKS) == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_named_benchmark_loads_from_its_local_copy(name, data_dir):
    problems = load_problems(get_spec(name), template=DEFAULT_TEMPLATE, data_dir=str(data_dir))
    ids, golds = EXPECTED[name]
    assert [p.id for p in problems] == ids
    assert [p.gold for p in problems] == golds
    first = rows()[name][0]
    text = first.get("problem", first.get("question"))
    for p in problems:
        assert p.benchmark == name
        assert p.example.prompt.endswith("put your final answer within \\boxed{}.")
    assert problems[0].example.prompt.startswith(text.replace("<image>", "").strip())
    image = problems[0].example.columns.get("image")
    assert (image is not None) == BENCHMARKS[name].vision
    if name == "mathvista":
        assert problems[0].choices == ["circle", "square", "triangle"]
        assert "A. circle\nB. square\nC. triangle" in problems[0].example.prompt
        assert problems[1].choices == []  # free-form row
    if name == "geometry3k":
        assert "<image>" not in problems[0].example.prompt


def test_image_of_a_vision_benchmark_decodes(data_dir):
    from mhpo.models.multimodal import load_image

    for name, color in (("geometry3k", (255, 0, 0)), ("mathvista", (255, 0, 0))):
        image = load_problems(get_spec(name), template=DEFAULT_TEMPLATE, data_dir=str(data_dir))[0].example.columns[
            "image"
        ]
        assert load_image(image).getpixel((0, 0)) == color


def test_hub_loading_uses_the_id_config_and_split(monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        key = next(n for n, s in BENCHMARKS.items() if s.hub_id == path)
        return dataset(key)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr("mhpo.evaluation.loading.hub_reachable", lambda: True)
    for name in ("math500", "gsm8k", "mathvista"):
        problems = load_problems(get_spec(name), template=DEFAULT_TEMPLATE)
        assert [p.gold for p in problems] == EXPECTED[name][1]
    assert calls == [
        ("HuggingFaceH4/MATH-500", None, "test"),
        ("openai/gsm8k", "main", "test"),
        ("AI4Math/MathVista", None, "testmini"),
    ]


def test_hub_failure_is_one_line_naming_the_source(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the hub\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr("mhpo.evaluation.loading.hub_reachable", lambda: True)
    with pytest.raises(ValueError, match=r"HuggingFaceH4/aime_2024 \[train\] could not be loaded .*--data-dir") as err:
        load_problems(get_spec("aime24"), template=DEFAULT_TEMPLATE)
    assert "\n" not in str(err.value)


def test_unknown_benchmark_lists_the_names():
    with pytest.raises(ValueError) as err:
        get_spec("math5000")
    msg = str(err.value)
    assert "unknown benchmark 'math5000'" in msg and "did you mean 'math500'" in msg
    for name in BENCHMARKS:
        assert name in msg


def test_local_file_with_default_and_flagged_columns(tmp_path):
    path = write_addition(tmp_path / "add.jsonl")
    problems = load_problems(get_spec(str(path)), template="{problem}=")
    assert [(p.benchmark, p.id, p.example.prompt, p.gold) for p in problems[:2]] == [
        ("add", "q0", "1+2=", "3"),
        ("add", "q1", "3+4=", "7"),
    ]
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"q": "2+2", "sol": 4, "key": "k1"}) + "\n")
    flagged = load_problems(
        get_spec(str(other), columns={"problem_column": "q", "answer_column": "sol", "id_column": "key"}),
        template="{problem}",
    )
    assert [(p.id, p.example.prompt, p.gold) for p in flagged] == [("k1", "2+2", "4")]
    # a local parquet with 'question' instead of 'problem' is found without flags; absent ids are row indices
    import datasets

    datasets.Dataset.from_list([{"question": "1+1", "answer": "2"}]).to_parquet(str(tmp_path / "q.parquet"))
    (p,) = load_problems(get_spec(str(tmp_path / "q.parquet")), template="{problem}")
    assert (p.id, p.example.prompt, p.gold) == ("0", "1+1", "2")


def test_missing_column_names_it_and_the_columns_present(tmp_path, data_dir):
    path = write_addition(tmp_path / "add.jsonl")
    with pytest.raises(
        ValueError, match=r"column 'solution' \(answer_column\) is missing; columns: id, problem, answer"
    ):
        load_problems(get_spec(str(path), columns={"answer_column": "solution"}), template="{problem}")
    with pytest.raises(ValueError, match=r"column 'problem' \(problem_column\) is missing; columns: question, answer"):
        load_problems(
            get_spec("gsm8k", columns={"problem_column": "problem"}), template="{problem}", data_dir=str(data_dir)
        )
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"text": "1+1", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match=r"no problem column .*--problem-column.*columns: text, answer"):
        load_problems(get_spec(str(bare)), template="{problem}")


def test_other_bad_input(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        get_spec(str(tmp_path / "missing.jsonl"))
    path = write_addition(tmp_path / "add.jsonl")
    with pytest.raises(ValueError, match=r"must contain \{problem\}"):
        load_problems(get_spec(str(path)), template="no placeholder")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"problem": "1+1", "answer": ""}) + "\n")
    with pytest.raises(ValueError, match=r"empty.jsonl:1\): column 'answer' is empty"):
        load_problems(get_spec(str(empty)), template="{problem}")


def test_scorer_in_the_worker_never_crashes_on_odd_completions():
    with AnswerScorer("boxed", timeout_s=20) as scorer:
        scorer.check()
        comps = ["\\boxed{4}", "", "no answer", "\\boxed{\\frac{", "\\boxed{9**9**9}", "\\boxed{B}", "\x00\\boxed{4}"]
        golds = ["4", "4", "4", "4", "4", "B", "4"]
        choices = [[], [], [], [], [], ["x", "y"], []]
        out = scorer.score(comps, golds, choices)
    assert [j.score for j in out] == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert [j.parsed is None for j in out] == [False, True, True, True, out[4].parsed is None, False, False]
    assert all(0.0 <= j.score <= 1.0 for j in out)


def test_an_unreachable_hub_fails_at_once_with_the_data_dir_hint(monkeypatch):
    import datasets
    from huggingface_hub import constants

    from mhpo.evaluation.loading import load_dataset_rows

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(ValueError, match=r"'math500': the Hugging Face hub is not reachable .*--data-dir"):
        load_dataset_rows(get_spec("math500"))
