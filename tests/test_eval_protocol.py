"""`mhpo eval --model M --benchmarks ...` end to end on the tiny model: outputs, agreement of
samples.jsonl and summary.json (recomputed here by brute force), determinism, resume, bad input,
a run directory as the model, the vision path, and the training hook."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from _eval_fixtures import write_addition, write_data_dir
from mhpo.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 4
PAIRS = [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from mhpo.models.tiny import build_tiny
    from mhpo.trainer.config import TinyModelConfig

    root = tmp_path_factory.mktemp("eval")
    model, tok = build_tiny(TinyModelConfig(), seed=0)
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    add = write_addition(root / "add.jsonl", PAIRS)
    sub = root / "sub.jsonl"
    sub.write_text("".join(json.dumps({"problem": f"{a}-{b}", "answer": str(a - b)}) + "\n" for a, b in PAIRS[:3]))
    return {"root": root, "model": str(root / "tiny"), "add": str(add), "sub": str(sub)}


def _eval(env, out, *extra, benchmarks=None):
    args = [
        "eval",
        "--model",
        env["model"],
        "--benchmarks",
        benchmarks or f"{env['add']},{env['sub']}",
        "--samples",
        str(K),
        "--max-new-tokens",
        "6",
        "--prompt-template",
        "{problem}=",
        "--threads",
        "1",
        "--batch-size",
        "8",
        "--answer-extraction",
        "math-verify",
        "--output-dir",
        str(out),
        *extra,
    ]
    return main(args)


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "samples.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def full(env):
    out = env["root"] / "full"
    assert _eval(env, out, "--greedy") == 0
    return out


def test_outputs_have_the_documented_shape(full):
    rows = _rows(full)
    assert [(r["benchmark"], r["id"]) for r in rows] == [("add", f"q{i}") for i in range(5)] + [
        ("sub", str(i)) for i in range(3)
    ]
    for r in rows:
        for key in ("completions", "answers", "parsed", "scores", "lengths", "truncated"):
            assert len(r[key]) == K, key
        assert all(0.0 <= s <= 1.0 for s in r["scores"])
        assert all(0 <= n <= 6 for n in r["lengths"])
        assert "greedy_score" in r and "greedy_completion" in r
    assert rows[0]["prompt"] == "1+2=" and rows[0]["gold"] == "3"
    summary = json.loads((full / "summary.json").read_text())
    assert set(summary["benchmarks"]) == {"add", "sub"}
    s = summary["settings"]
    assert (s["samples"], s["max_new_tokens"], s["temperature"], s["top_p"], s["seed"]) == (K, 6, 0.6, 0.95, 0)
    assert s["pass_k"] == [1, 2, 4] and s["answer_extraction"] == "math-verify" and s["template"] == "{problem}="
    assert summary["benchmarks"]["add"]["settings"] == s
    md = (full / "summary.md").read_text()
    assert "| model | add | sub | Avg |" in md
    assert "pass@4" in md and "maj@4" in md and "greedy" in md and "tie" in md


def _brute(rows: list[dict]) -> dict[str, float]:
    """The metrics of a benchmark recomputed from its rows without mhpo's estimators."""
    out: dict[str, float] = {}
    for k in (1, 2, 4):
        vals = []
        for r in rows:
            ok = [s >= 1 - 1e-6 for s in r["scores"]]
            subsets = list(itertools.combinations(range(K), k))
            vals.append(sum(any(ok[i] for i in sub) for sub in subsets) / len(subsets))
        out[f"pass@{k}"] = sum(vals) / len(vals)
    out[f"avg@{K}"] = sum(sum(r["scores"]) / K for r in rows) / len(rows)
    maj = []
    for r in rows:
        votes = [p for p in r["parsed"] if p is not None]
        if not votes:
            maj.append(0.0)
            continue
        best = max(votes.count(v) for v in votes)
        winner = next(v for v in r["parsed"] if v is not None and votes.count(v) == best)
        maj.append(r["scores"][r["parsed"].index(winner)])
    out[f"maj@{K}"] = sum(maj) / len(maj)
    out["no_answer_rate"] = sum(sum(p is None for p in r["parsed"]) for r in rows) / (K * len(rows))
    out["truncation_rate"] = sum(sum(r["truncated"]) for r in rows) / (K * len(rows))
    out["mean_length"] = sum(sum(r["lengths"]) for r in rows) / (K * len(rows))
    out["greedy"] = sum(r["greedy_score"] for r in rows) / len(rows)
    return out


def test_summary_agrees_with_samples(full):
    rows, summary = _rows(full), json.loads((full / "summary.json").read_text())
    for name in ("add", "sub"):
        mine = [r for r in rows if r["benchmark"] == name]
        got = summary["benchmarks"][name]
        assert got["n_problems"] == len(mine) and got["samples"] == K
        for key, value in _brute(mine).items():
            assert got[key] == pytest.approx(value, abs=1e-12), (name, key)
    macro = summary["macro"]
    assert macro[f"avg@{K}"] == pytest.approx(
        (summary["benchmarks"]["add"][f"avg@{K}"] + summary["benchmarks"]["sub"][f"avg@{K}"]) / 2
    )
    # a random model on a 95-character alphabet: some samples parse (digits), most do not
    assert 0 < summary["benchmarks"]["add"]["no_answer_rate"] < 1


def test_same_seed_same_samples_and_another_seed_differs(env, full, tmp_path):
    assert _eval(env, tmp_path / "again", "--greedy") == 0
    assert _rows(tmp_path / "again") == _rows(full)
    assert _eval(env, tmp_path / "seed1", "--greedy", "--seed", "1") == 0
    assert [r["completions"] for r in _rows(tmp_path / "seed1")] != [r["completions"] for r in _rows(full)]


def test_resume_after_a_kill_equals_the_uninterrupted_run(env, full, tmp_path):
    out = tmp_path / "killed"
    out.mkdir()
    lines = (full / "samples.jsonl").read_text().splitlines(keepends=True)
    # batches of 2 problems: batch 0 complete, one row of batch 1, then a torn half line
    (out / "samples.jsonl").write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    (out / "settings.json").write_text((full / "settings.json").read_text())
    assert _eval(env, out, "--greedy") == 0
    assert sorted(map(json.dumps, _rows(out))) == sorted(map(json.dumps, _rows(full)))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["resumed_problems"] == 3
    assert summary["benchmarks"] == json.loads((full / "summary.json").read_text())["benchmarks"]
    # a rerun of a finished evaluation samples nothing
    assert _eval(env, out, "--greedy") == 0
    assert json.loads((out / "summary.json").read_text())["run"]["completion_tokens"] == 0


def test_rerun_with_other_settings_is_refused(env, full, capsys):
    assert _eval(env, full, "--greedy", "--temperature", "0.9") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "temperature: 0.6 -> 0.9" in err


def test_bad_input_exits_2_with_one_line(env, tmp_path, capsys):
    assert _eval(env, tmp_path / "a", "--pass-k", "1,8") == 2
    assert "pass@8 needs at least 8 samples per problem, but --samples is 4" in capsys.readouterr().err
    assert _eval(env, tmp_path / "b", benchmarks="math5000") == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'math5000'" in err and "aime24" in err and "mathvista" in err
    assert _eval(env, tmp_path / "c", "--answer-column", "solution") == 2
    assert "column 'solution' (answer_column) is missing; columns: id, problem, answer" in capsys.readouterr().err
    assert main(["eval", "--benchmarks", env["add"]]) == 2
    assert "needs --model" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # nothing written before the input is checked


def test_a_run_directory_is_a_model(env, tmp_path):
    from mhpo.models.loading import load_pretrained
    from mhpo.trainer.checkpoint import save_checkpoint
    from mhpo.trainer.config import load_config, save_config

    model, tok = load_pretrained(env["model"], dtype=torch.float32, device=torch.device("cpu"))
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(None, ["model.chat_template=off"]), run / "config.yaml")
    save_checkpoint(
        run / "checkpoints",
        7,
        model=model,
        tokenizer=tok,
        optimizer=None,
        scheduler=None,
        state={},
        keep=1,
        kind="model",
    )
    assert (
        main(
            [
                "eval",
                str(run),
                "--benchmarks",
                env["sub"],
                "--samples",
                "2",
                "--max-new-tokens",
                "4",
                "--prompt-template",
                "{problem}=",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    summary = json.loads((run / "eval" / "benchmarks" / "summary.json").read_text())
    assert summary["model"]["path"].endswith("checkpoints/step_000007")
    assert summary["benchmarks"]["sub"]["n_problems"] == 3


def test_vision_benchmark_end_to_end_on_the_tiny_vlm(env, tmp_path, capsys):
    from mhpo.models.vlm import build_tiny_vlm
    from mhpo.trainer.config import load_config

    cfg = load_config("vlm")
    model, processor = build_tiny_vlm(cfg.model.tiny, cfg.model.vision, seed=0)
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    data = write_data_dir(tmp_path / "data")
    args = [
        "eval",
        "--benchmarks",
        "geometry3k,mathvista",
        "--data-dir",
        str(data),
        "--samples",
        "2",
        "--max-new-tokens",
        "3",
        "--threads",
        "1",
        "--output-dir",
        str(tmp_path / "out"),
    ]
    assert main([*args[:1], "--model", str(tmp_path / "vlm"), *args[1:]]) == 0
    rows = _rows(tmp_path / "out")
    assert [(r["benchmark"], r["id"]) for r in rows] == [
        ("geometry3k", "0"),
        ("geometry3k", "1"),
        ("mathvista", "1"),
        ("mathvista", "2"),
    ]
    assert "<|image_pad|>" in rows[0]["prompt"] and rows[2]["choices"] == ["circle", "square", "triangle"]
    assert rows[2]["gold"] == "B"
    # a text-only model refuses a benchmark with images
    assert main([*args[:1], "--model", env["model"], *args[1:-1], str(tmp_path / "out2")]) == 2
    assert "has images but the model is text-only" in capsys.readouterr().err


def test_training_hook_reports_benchmarks_and_leaves_the_rng_alone(env, tmp_path):
    from mhpo.evaluation.hook import BenchmarkHook
    from mhpo.generation.prompts import build_encoder, eos_token_ids
    from mhpo.models.loading import load_pretrained
    from mhpo.trainer.config import load_config

    cfg = load_config(
        None,
        [
            f"eval.benchmarks=[{env['add']}, {env['sub']}]",
            "eval.benchmark_samples=2",
            "eval.benchmark_limit=2",
            "eval.batch_size=4",
        ],
    )
    model, tok = load_pretrained(env["model"], dtype=torch.float32, device=torch.device("cpu"))
    hook = BenchmarkHook(cfg.eval, tmp_path, max_new_tokens=4)
    try:
        torch.manual_seed(123)
        state = torch.get_rng_state()
        a = hook(model, tok, build_encoder(tok, chat_template="auto"), eos_token_ids(model, tok), step=5)
        assert torch.equal(torch.get_rng_state(), state)  # training's RNG untouched
        b = hook(model, tok, build_encoder(tok, chat_template="auto"), eos_token_ids(model, tok), step=6)
    finally:
        hook.close()
    assert a == b  # same problems, same seeds at every evaluation
    for name in ("add", "sub"):
        for key in ("avg@2", "pass@1", "pass@2", "maj@2", "no_answer_rate", "truncation_rate", "mean_length"):
            assert f"bench/{name}/{key}" in a
    assert "bench/macro/avg@2" in a
    rows = [json.loads(x) for x in (tmp_path / "samples" / "benchmarks_step_000005.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["completions"]) == 2 for r in rows)
