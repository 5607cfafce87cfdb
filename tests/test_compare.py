"""`mhpo compare` and `mhpo report`: a small real comparison whose report numbers are recomputed
here, independently, from each run's evals.jsonl and metrics.jsonl."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from mhpo.cli import main

SMALL = [
    "task.args.digits=2",
    "warmup.threshold=0.25",
    "warmup.max_steps=600",
    "warmup.eval_every=25",
    "warmup.eval_size=64",
    "eval.size=48",
    "eval.every=2",
    "eval.pass_k=0",
    "rollout.prompts_per_step=8",
    "rollout.group_size=4",
    "train.checkpoint_every=3",
    "train.report_to=[]",
]
TARGET = 0.6


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "c"
    args = [
        "compare",
        "--objectives",
        "mhpo,grpo",
        "--seeds",
        "2",
        "--steps",
        "6",
        "--output-dir",
        str(out),
        "--target",
        str(TARGET),
        *SMALL,
    ]
    assert main(args) == 0
    return out, args


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def recompute(run_dir: Path) -> dict:
    """The report's per-run numbers, from the raw logs, written without mhpo.compare.report."""
    evals = [e for e in read(run_dir / "evals.jsonl")]
    metrics = read(run_dir / "metrics.jsonl")
    acc = [e["greedy/accuracy"] for e in evals]
    steps = [e["step"] for e in evals]
    grads = [m["grad_norm/max"] for m in metrics if "grad_norm/max" in m]
    med = statistics.median(grads)
    ent = [m["entropy"] for m in metrics]
    k = min(10, len(ent) // 2)
    hits = [s for s, a in zip(steps, acc) if a >= TARGET]
    lengths = [m["response_length/mean"] for m in metrics]
    return {
        "accuracy_before_rl": acc[0],
        "final_accuracy": acc[-1],
        "best_accuracy": max(acc),
        "steps_to_target": hits[0] if hits else None,
        "collapsed": acc[-1] < max(acc) / 2,
        "grad_spikes": sum(1 for g in grads if g > 5 * med),
        "max_grad_norm": max(grads),
        "p99_abs_log_ratio": statistics.median([m["policy/log_ratio/abs_p99"] for m in metrics][len(metrics) // 2 :]),
        "entropy_change": statistics.mean(ent[-k:]) - statistics.mean(ent[:k]),
        "clip_frac": statistics.mean([m["policy/clip_frac"] for m in metrics][len(metrics) // 2 :]),
        "response_length": statistics.mean(lengths[-k:]),
    }


def test_report_numbers_equal_recomputation_from_the_runs(comparison):
    out, _ = comparison
    report = json.loads((out / "report.json").read_text())
    assert list(report["objectives"]) == ["mhpo", "grpo"] and report["reference"] == "mhpo"
    per_label: dict[str, list[dict]] = {}
    for label in ("mhpo", "grpo"):
        for seed in (0, 1):
            run_dir = out / "runs" / label / f"seed{seed}"
            mine = recompute(run_dir)
            theirs = next(r for r in report["runs"] if r["label"] == label and r["seed"] == seed)
            for key, value in mine.items():
                if value is None or isinstance(value, bool):
                    assert theirs[key] == value, (label, seed, key)
                else:
                    assert theirs[key] == pytest.approx(value, rel=1e-12, abs=1e-12), (label, seed, key)
            per_label.setdefault(label, []).append(mine)
    for label, runs in per_label.items():
        row = report["objectives"][label]
        for key in (
            "final_accuracy",
            "best_accuracy",
            "max_grad_norm",
            "p99_abs_log_ratio",
            "entropy_change",
            "grad_spikes",
            "clip_frac",
            "response_length",
        ):
            values = [float(r[key]) for r in runs]
            assert row[key][0] == pytest.approx(statistics.mean(values), rel=1e-12, abs=1e-12), (label, key)
            assert row[key][1] == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-12), (label, key)
        assert row["collapses"] == sum(r["collapsed"] for r in runs)
        reached = [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None]
        assert row["reached_target"] == len(reached)
    # the comparison is not degenerate: the model answers some problems and the updates move it
    all_runs = [r for runs in per_label.values() for r in runs]
    assert max(r["best_accuracy"] for r in all_runs) > 0.2
    assert min(r["max_grad_norm"] for r in all_runs) > 0
    assert min(r["p99_abs_log_ratio"] for r in all_runs) > 0


def test_same_seed_shares_one_warmup_and_differs_only_in_objective(comparison):
    out, _ = comparison
    warm = {}
    for label in ("mhpo", "grpo"):
        for seed in (0, 1):
            s = json.loads((out / "runs" / label / f"seed{seed}" / "summary.json").read_text())
            warm.setdefault(seed, set()).add(s["warmup"]["path"])
            first = read(out / "runs" / label / f"seed{seed}" / "evals.jsonl")[0]
            warm.setdefault(("before", seed), set()).add(first["greedy/accuracy"])
    for seed in (0, 1):
        assert len(warm[seed]) == 1  # one warm-up checkpoint per seed ...
        assert len(warm[("before", seed)]) == 1  # ... so accuracy before RL is identical across objectives
    assert warm[0] != warm[1]


def test_rerun_skips_finished_runs_and_continues_a_stopped_one(comparison, capsys):
    out, args = comparison
    stopped = out / "runs" / "grpo" / "seed1" / "summary.json"
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("summary.json") if p != stopped}
    report_before = json.loads((out / "report.json").read_text())
    stopped.unlink()  # as if the run had been killed before it finished
    assert main(args) == 0
    assert stopped.is_file()
    assert {p: p.stat().st_mtime_ns for p in before} == before  # finished runs were not rerun
    report_after = json.loads((out / "report.json").read_text())
    untimed = lambda runs: [{k: v for k, v in r.items() if k != "wall_seconds"} for r in runs]  # noqa: E731
    assert untimed(report_after["runs"]) == untimed(report_before["runs"])


def test_report_rerenders_and_html_is_self_contained(comparison, tmp_path):
    out, _ = comparison
    assert main(["report", str(out / "runs"), "--out", str(tmp_path), "--target", str(TARGET)]) == 0
    again = json.loads((tmp_path / "report.json").read_text())
    original = json.loads((out / "report.json").read_text())
    assert again["runs"] == original["runs"] and again["objectives"] == original["objectives"]
    assert any(r["entropy_change"] != 0 for r in again["runs"])
    page = (tmp_path / "report.html").read_text()
    curves = (
        "greedy_accuracy",
        "reward_mean",
        "grad_norm",
        "entropy",
        "policy_log_ratio_abs_p99",
        "policy_clip_frac",
        "policy_mhpo_survival_mean",
        "response_length_mean",
    )
    assert page.count("data:image/png;base64,") == len(curves)
    assert 'src="http' not in page and "<link" not in page
    md = (tmp_path / "report.md").read_text()
    assert "| mhpo | 2 |" in md and "| grpo | 2 |" in md
    for name in curves:
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"]({name}.png)" in md


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["compare", "--preset", "nope", "--output-dir", str(tmp_path)]) == 2
    assert "unknown preset 'nope'; valid presets: default, stress, ablation, c-sweep" in capsys.readouterr().err
    assert main(["compare", "--objectives", "mhpo,grpx", "--output-dir", str(tmp_path)]) == 2
    assert "unknown objective 'grpx'" in capsys.readouterr().err
    assert main(["compare", "--objectives", "mhpo[c=0]", "--output-dir", str(tmp_path)]) == 2
    assert "hparam c=0 is out of range" in capsys.readouterr().err
    assert main(["compare", "--objectives", "mhpo", "optim.lrr=1", "--output-dir", str(tmp_path)]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_objective_specs_parse_with_hparams():
    from mhpo.compare import parse_objectives, slug

    specs = parse_objectives("mhpo[c=0.5,k_pos=2],grpo,dapo[eps_high=0.3]")
    assert specs == [
        ("mhpo[c=0.5,k_pos=2]", "mhpo", {"c": 0.5, "k_pos": 2}),
        ("grpo", "grpo", {}),
        ("dapo[eps_high=0.3]", "dapo", {"eps_high": 0.3}),
    ]
    assert slug("mhpo[c=0.5,k_pos=2]") == "mhpo_c=0.5_k_pos=2"


def test_parallel_runs_share_the_cores_unless_threads_are_set():
    from mhpo.compare import parse_objectives, plan_jobs
    from mhpo.trainer.config import load_config

    specs = parse_objectives("mhpo,grpo")
    auto = plan_jobs(load_config(None, []), specs, [0], Path("out"), threads=1)
    assert [j.config["train"]["threads"] for j in auto] == [1, 1]
    fixed = plan_jobs(load_config(None, ["train.threads=3"]), specs, [0], Path("out"), threads=1)
    assert [j.config["train"]["threads"] for j in fixed] == [3, 3]


def test_curves_without_mhpo_leave_out_the_survival_plot(tmp_path):
    from mhpo.compare.report import Run, plot_curves

    def run(seed):
        metrics = [
            {
                "step": t,
                "reward/mean": 0.1 * t,
                "grad_norm": 1.0,
                "entropy": 1.0 - 0.1 * t,
                "policy/log_ratio/abs_p99": 0.2,
                "policy/clip_frac": 0.01 * t,
                "response_length/mean": 10.0 + t,
            }
            for t in range(1, 4)
        ]
        evals = [{"step": 0, "greedy/accuracy": 0.5}, {"step": 3, "greedy/accuracy": 0.7}]
        return Run(tmp_path / f"s{seed}", "grpo", seed, {}, evals, metrics, {})

    names = sorted(p.name for p in plot_curves([run(0), run(1)], tmp_path))
    assert "policy_mhpo_survival_mean.png" not in names
    assert names == sorted(
        [
            "greedy_accuracy.png",
            "reward_mean.png",
            "grad_norm.png",
            "entropy.png",
            "policy_log_ratio_abs_p99.png",
            "policy_clip_frac.png",
            "response_length_mean.png",
        ]
    )
