"""train.report_to: TensorBoard, wandb (offline) and trackio get the numbers metrics.jsonl holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from _train_helpers import SMALL, jsonl, mhpo_cli
from mhpo.trainer.trackers import TRACKERS, check_report_to, finite_scalars

RUN = [*SMALL, "train.steps=2", "train.checkpoint_every=0", "eval.every=0", "train.final_checkpoint=none"]


def test_unknown_or_missing_trackers_are_one_line_errors(tmp_path):
    out = mhpo_cli("train", "train.report_to=[tensorbord]", "--output-dir", str(tmp_path / "r"))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "mhpo train: error: unknown tracker 'tensorbord' in train.report_to (did you mean 'tensorboard'?); "
        "valid: tensorboard, wandb, trackio"
    ]
    assert set(TRACKERS) == {"tensorboard", "wandb", "trackio"}
    check_report_to([])  # no tracker at all is valid: metrics.jsonl is always written


def test_finite_scalars_keep_numbers_only():
    values = {"a": 1, "b": 2.5, "c": float("nan"), "d": float("inf"), "e": True, "f": "first error", "g": None}
    assert finite_scalars(values) == {"a": 1.0, "b": 2.5}


def wandb_history(path):
    """The history rows of a .wandb transaction log: the LevelDB log format (32 KiB blocks of
    chunks, each with a 7-byte header: crc32, length, kind 1 full | 2 first | 3 middle | 4 last)
    holding wandb's protobuf Records, read without a W&B server or account."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record.FromString(buf)
            if record.WhichOneof("record_type") == "history":
                yield {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    pytest.importorskip("wandb", reason="wandb is not installed: pip install 'mhpo[wandb]' (scripts/setup.sh --dev)")
    pytest.importorskip("trackio", reason="trackio is not installed: scripts/setup.sh --dev installs it")
    root = tmp_path_factory.mktemp("trackers")
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "TRACKIO_DIR": str(root / "trackio"),
        "TRACKIO_PROJECT": "t",
    }
    run = root / "run"
    out = mhpo_cli(
        "train", *RUN, "train.report_to=[tensorboard,wandb,trackio]", "--output-dir", str(run), env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return run, env


def test_every_tracker_gets_the_logged_numbers(tracked_run):
    run, env = tracked_run
    metrics, evals = jsonl(run / "metrics.jsonl"), jsonl(run / "evals.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and len(evals) == 2
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    # wandb, offline: every logged number is in the run's transaction log, at its step
    (log,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    history = {row["_step"]: row for row in wandb_history(log)}
    assert [history[m["step"]]["train/entropy"] for m in metrics] == pytest.approx([m["entropy"] for m in metrics])
    assert [history[e["step"]]["eval/greedy/accuracy"] for e in evals] == [e["greedy/accuracy"] for e in evals]

    # trackio: read back from its SQLite store by a fresh process (it reads TRACKIO_DIR on import)
    read = (
        "import json, trackio; from trackio import SQLiteStorage; "
        "print(json.dumps(SQLiteStorage.get_logs('t', SQLiteStorage.get_runs('t')[0])))"
    )
    done = subprocess.run([sys.executable, "-c", read], env={**os.environ, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    logs = [r for r in json.loads(done.stdout.strip().splitlines()[-1]) if "train/entropy" in r]
    assert [r["step"] for r in logs] == [1, 2]
    assert [r["train/entropy"] for r in logs] == pytest.approx([m["entropy"] for m in metrics])


def test_run_configs_written_before_report_to_still_load(tmp_path):
    import yaml

    from mhpo.trainer.config import from_dict, load_config, to_dict

    for old, new in ((True, ["tensorboard"]), (False, [])):
        tree = to_dict(load_config(None, []))
        del tree["train"]["report_to"]
        tree["train"]["tensorboard"] = old
        assert from_dict(tree).train.report_to == new
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))  # a run directory's saved config
        assert load_config(tmp_path / "config.yaml").train.report_to == new
