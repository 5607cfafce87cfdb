"""Behaviour log-probs from the sampler, and a sampling precision that differs from the update's:
the training-inference mismatch is measured (and is ~0 when sampler and trainer compute alike)."""

from __future__ import annotations

import pytest

from _train_helpers import jsonl, small_config
from mhpo.trainer.loop import run_training


def _run(tmp_path, name: str, *overrides: str) -> list[dict]:
    cfg = small_config("train.steps=3", "eval.size=0", "train.report_to=[]", "train.checkpoint_every=0", *overrides)
    run_training(cfg, tmp_path / name, resume="never")
    return jsonl(tmp_path / name / "metrics.jsonl")


def test_sampler_logprobs_match_the_trainer_at_the_same_precision(tmp_path):
    metrics = _run(tmp_path, "same", "rollout.behaviour_logprobs=sampler", "rollout.log_mismatch=true")
    for m in metrics:
        assert m["mismatch/abs_log_ratio_max"] < 1e-4
        assert 0 <= m["mismatch/abs_log_ratio_mean"] <= m["mismatch/abs_log_ratio_p99"]
        assert m["staleness/policy_lag"] == 0 and "entropy" in m


def test_bf16_sampling_with_sampler_logprobs_is_a_measured_mismatch(tmp_path):
    metrics = _run(tmp_path, "bf16", "rollout.behaviour_logprobs=sampler", "rollout.precision=bf16")
    assert min(m["mismatch/abs_log_ratio_mean"] for m in metrics) > 1e-4  # bf16 rounding, on every step
    assert all(m["mismatch/abs_log_ratio_p99"] <= m["mismatch/abs_log_ratio_max"] for m in metrics)


def test_without_the_mismatch_pass_nothing_is_recomputed(tmp_path, monkeypatch):
    """No trainer pass: the entropy comes from the sampler, equal to the trainer's on the same samples."""
    import mhpo.trainer.step as step

    with_pass = _run(tmp_path, "on", "rollout.behaviour_logprobs=sampler", "rollout.log_mismatch=true")
    calls = []
    monkeypatch.setattr(step, "rollout_logprobs", lambda *a, **k: calls.append(1))
    metrics = _run(tmp_path, "off", "rollout.behaviour_logprobs=sampler", "rollout.log_mismatch=false")
    assert not calls and not [k for k in metrics[0] if k.startswith("mismatch/")]
    assert metrics[0]["reward/mean"] == with_pass[0]["reward/mean"]  # the same samples at step 1 ...
    assert abs(metrics[0]["entropy"] - with_pass[0]["entropy"]) < 1e-5  # ... and the same entropy


def test_auto_takes_the_samplers_logprobs_only_where_both_run_float32(tmp_path):
    from mhpo.trainer.config import load_config
    from mhpo.trainer.defaults import resolve_defaults

    def resolved(*overrides):
        r = resolve_defaults(load_config(None, list(overrides)), 4).rollout
        return r.behaviour_logprobs, r.log_mismatch

    assert resolved("model.dtype=float32") == ("sampler", False)
    assert resolved("model.dtype=float32", "rollout.precision=bf16") == ("trainer", False)
    assert resolved("model.dtype=bf16-mixed") == ("trainer", False)
    assert resolved("model.dtype=float32", "rollout.behaviour_logprobs=trainer") == ("trainer", False)
    assert resolved("rollout.behaviour_logprobs=sampler", "rollout.precision=bf16") == ("sampler", True)
    assert resolved("model.dtype=float32", "rollout.log_mismatch=true") == ("sampler", True)


@pytest.mark.parametrize("staleness", [1, 3])
def test_staleness_lags_fill_then_hold(tmp_path, staleness):
    metrics = _run(tmp_path, f"k{staleness}", f"rollout.staleness={staleness}", "train.steps=5")
    assert [m["staleness/policy_lag"] for m in metrics] == [min(t, staleness) for t in range(5)]
    assert [m["staleness/optimizer_lag"] for m in metrics] == [2 * min(t, staleness) for t in range(5)]
