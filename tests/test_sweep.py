"""`mhpo compare --sweep`: objectives x seeds x values of one key, a report per value and the
stability envelope; and a comparison whose parent is SIGKILLed leaves no worker behind and reruns
to exactly the same runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _train_helpers import ENV, jsonl
from mhpo.cli import main
from mhpo.compare.envelope import parse_sweep
from mhpo.errors import UsageError
from mhpo.trainer.metrics import strip_timing
from test_compare import SMALL

SWEEP = "rollout.staleness=0,3"
RUNS = [(v, o) for v in ("0", "3") for o in ("mhpo", "grpo")]


def _args(out: Path, objectives: str = "mhpo,grpo") -> list[str]:
    return ["compare", "--objectives", objectives, "--seeds", "1", "--steps", "6", "--sweep", SWEEP] + [
        "--output-dir",
        str(out),
        "--jobs",
        "1",
        *SMALL,
    ]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "s"
    assert main(_args(out)) == 0
    return out


def _run_dir(out: Path, value: str, objective: str) -> Path:
    return out / "runs" / f"rollout.staleness={value}" / objective / "seed0"


def test_sweep_writes_a_report_per_value_and_the_envelope(sweep):
    for value in ("0", "3"):
        report = json.loads((sweep / f"rollout.staleness={value}" / "report.json").read_text())
        assert set(report["objectives"]) == {"mhpo", "grpo"}
    for name in ("envelope.md", "envelope.html", "envelope.json", "envelope.png"):
        assert (sweep / name).stat().st_size > 0
    env = json.loads((sweep / "envelope.json").read_text())
    assert env["key"] == "rollout.staleness" and env["values"] == ["0", "3"]
    for objective in ("mhpo", "grpo"):  # staler batches: heavier ratio tails
        p99 = [env["table"][v][objective]["p99_abs_log_ratio"][0] for v in ("0", "3")]
        assert p99[1] > 2 * p99[0] > 0, (objective, p99)
    lags = [m["staleness/policy_lag"] for m in jsonl(_run_dir(sweep, "3", "mhpo") / "metrics.jsonl")]
    assert lags == [0, 1, 2, 3, 3, 3]
    warm = {json.loads((_run_dir(sweep, v, o) / "summary.json").read_text())["warmup"]["path"] for v, o in RUNS}
    assert len(warm) == 1  # one warm-up for the seed, shared by every value and objective
    html = (sweep / "envelope.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html


def test_the_envelope_keeps_a_value_whose_runs_are_gone_from_its_report(sweep, tmp_path, capsys):
    """A new checkout has the committed reports but not the run directories: rendering the envelope
    there (e.g. after a new value finished) reads the missing value's runs from its report.json."""
    import shutil

    out = tmp_path / "s"
    shutil.copytree(sweep, out, ignore=shutil.ignore_patterns("envelope.*"))
    shutil.rmtree(out / "runs" / "rollout.staleness=0")  # value 0: only its report is left
    assert main(["report", str(out), "--sweep", "rollout.staleness"]) == 0
    before, after = (json.loads((d / "envelope.json").read_text()) for d in (sweep, out))
    assert after["values"] == ["0", "3"] and after["table"] == before["table"]
    (out / "rollout.staleness=0" / "report.json").write_text("{}")
    assert main(["report", str(out), "--sweep", "rollout.staleness"]) == 2
    assert "report.json: not a report.json with a 'runs' list" in capsys.readouterr().err


def test_bad_sweeps_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(UsageError, match="KEY=v1,v2"):
        parse_sweep("rollout.staleness")
    with pytest.raises(UsageError, match="twice"):
        parse_sweep("rollout.staleness=1,1")
    assert main(["compare", "--sweep", "rollout.stalenes=0,1", "--output-dir", str(tmp_path)]) == 2
    assert "rollout.stalenes" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc (Linux)")
def test_a_killed_parent_leaves_no_worker_and_the_rerun_reproduces_the_runs(sweep, tmp_path):
    out = tmp_path / "s"
    # One objective: its runs are the sweep fixture's (same seed, value and warm-up config).
    cmd = [sys.executable, "-m", "mhpo.cli", *_args(out, "mhpo")]
    parent = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = _run_dir(out, "0", "mhpo") / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (first.is_file() and len(jsonl(first)) >= 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = _children(parent.pid)
    assert workers, "no worker process was running"
    os.kill(parent.pid, signal.SIGKILL)  # the parent alone, as the OOM killer does
    parent.wait()
    deadline = time.monotonic() + 20
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [w for w in workers if _alive(w)]

    rerun = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert not (out / "runs" / "rollout.staleness=0" / "grpo").exists()
    for value in ("0", "3"):
        a, b = (jsonl(_run_dir(d, value, "mhpo") / "metrics.jsonl") for d in (sweep, out))
        assert len(b) == 6
        assert [strip_timing(m) for m in a] == [strip_timing(m) for m in b], value
