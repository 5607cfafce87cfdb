"""Hardening: reward results validated; a broken reward function stops the run, a flaky one never does."""

from __future__ import annotations

import pytest

from mhpo.rewards import ErrorBudget, RewardFunctionError, RewardScorer
from mhpo.tasks import Example

USER = """
def one_score_for_all(prompts, completions, **kw):
    return [1.0, 1.0, 1.0, 1.0]

def bare_number(prompts, completions, **kw):
    return 1.0

def always_raises(prompts, completions, **kw):
    raise KeyError("solution")

def returns_strings(prompts, completions, **kw):
    return ["high"] * len(completions)

def flaky(prompts, completions, **kw):
    if any(c.endswith("3") for c in completions):
        raise RuntimeError("flaky")
    return [1.0] * len(completions)

def good(prompts, completions, **kw):
    return [0.5] * len(completions)
"""


@pytest.fixture()
def user_file(tmp_path):
    f = tmp_path / "user_rewards.py"
    f.write_text(USER)
    return f


def _scorer(user_file, *names, **kw):
    return RewardScorer([f"{user_file}:{n}" for n in names], "exact_match", None, 5.0, **kw)


def test_wrong_length_and_non_list_results_stop_with_one_line(user_file):
    scorer = _scorer(user_file, "good", "one_score_for_all")
    try:
        with pytest.raises(RewardFunctionError) as err:
            scorer.score([Example("q", "a")] * 2, ["x", "y"])
        assert str(err.value) == (
            "reward function 'one_score_for_all' returned 4 score(s) for 1 completion(s); it must return "
            "one score per completion (expected length 1, got 4)"
        )
    finally:
        scorer.close()
    scorer = _scorer(user_file, "bare_number")
    try:
        with pytest.raises(
            RewardFunctionError, match=r"^reward function 'bare_number' returned float 1.0, not a list of scores"
        ):
            scorer.score([Example("q", "a")], ["x"])
    finally:
        scorer.close()


@pytest.mark.parametrize(
    "name,first",
    [("always_raises", "KeyError: 'solution'"), ("returns_strings", "ValueError: score 'high' is not a number")],
)
def test_a_function_failing_on_the_whole_first_batch_stops_the_run(user_file, name, first):
    scorer = _scorer(user_file, "good", name)
    try:
        with pytest.raises(RewardFunctionError) as err:
            scorer.score([Example("q", "a")] * 4, ["c0", "c1", "c2", "c3"])
        assert str(err.value) == (
            f"reward function {name!r} failed on all 4 completion(s) of the first batch it scored "
            f"(first error: {first})"
        )
        assert "\n" not in str(err.value)
    finally:
        scorer.close()


def test_a_flaky_function_never_stops_training(user_file):
    scorer = _scorer(user_file, "flaky", max_error_frac=0.5, error_window=3)
    try:
        for step in range(8):  # 1 in 4 completions fails, every batch
            s = scorer.score([Example("q", "a")] * 4, [f"s{step}c{i}" for i in range(4)])
            assert s.failures == {"flaky": 1} and s.errors == 1  # the batch raised: one by one, one failure
            assert s.per_function["flaky"] == [1.0, 1.0, 1.0, 0.0]
            assert s.fallbacks == ["flaky: batch call failed (RuntimeError: flaky)"]
    finally:
        scorer.close()


def test_error_budget_window_rule():
    b = ErrorBudget(max_frac=0.5, window=3)
    assert b.record("f", 2, 4, "E: a") is None  # half of the first batch: not all of it
    assert b.record("f", 3, 4, "E: b") is None  # window not full yet
    stop = b.record("f", 3, 4, "E: c")  # 8 of 12 > 0.5
    assert stop == (
        "reward function 'f' failed on 8 of 12 completions (67%) over the last 3 scoring batches, more than "
        "rewards.max_error_frac=0.5 (first error: E: a)"
    )
    b = ErrorBudget(max_frac=0.5, window=2)
    assert b.record("g", 1, 4, None) is None and b.record("g", 2, 4, "x") is None  # 3 of 8: under the budget
    assert b.record("g", 4, 4, "y") is not None  # 6 of 8 over the last 2
    never = ErrorBudget(max_frac=1.0, window=1)
    assert never.record("h", 0, 4, None) is None and never.record("h", 4, 4, "z") is None  # 1.0: window rule off
    assert ErrorBudget().record("k", 4, 4, "line one\nline two") == (
        "reward function 'k' failed on all 4 completion(s) of the first batch it scored (first error: line one line "
        "two)"
    )
    with pytest.raises(ValueError, match="rewards.max_error_frac=0 must be in"):
        ErrorBudget(max_frac=0)


def test_budget_config_keys_have_documented_defaults():
    from mhpo.trainer.config import Config, ConfigError, commented_yaml, load_config

    cfg = load_config(None, [])
    assert (cfg.rewards.max_error_frac, cfg.rewards.error_window) == (0.5, 20)
    documented = commented_yaml(Config())
    assert "max_error_frac: 0.5  # " in documented and "error_window: 20  # " in documented
    with pytest.raises(ConfigError, match=r"'rewards.max_error_frac'=1.5 is out of range; it must be in \(0, 1\]"):
        load_config(None, ["rewards.max_error_frac=1.5"])
