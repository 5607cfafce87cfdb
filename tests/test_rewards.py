"""Reward functions in the timeout worker: hard time limits, errors that score 0, TRL's signature."""

from __future__ import annotations

import os
import time

import pytest

from mhpo.rewards import RewardScorer, resolve
from mhpo.rewards.timeout_worker import TimeoutWorker
from mhpo.tasks import Example

USER = """
import os, time
CALLS = []

def hang_on_hang(prompts, completions, **kw):
    if "hang" in completions:
        while True:
            time.sleep(0.01)
    return [1.0] * len(completions)

def raise_on_boom(prompts, completions, answer, **kw):
    if "boom" in completions:
        raise RuntimeError("kaboom")
    return [float(c == a) for c, a in zip(completions, answer)]

def echo_columns(prompts, completions, **columns):
    return [float(len(e) + (p == "p")) for e, p in zip(columns["extra"], prompts)]

def malformed(prompts, completions, **kw):
    return [{"x": float("nan"), "boom": "high"}.get(c, 1.0) for c in completions]

def pid(prompts, completions, **kw):
    return [float(os.getpid())] * len(completions)

def rank_in_batch(prompts, completions, **kw):
    # group-relative: the rank of each completion's length within the batch, scaled to [0, 1]
    order = sorted(range(len(completions)), key=lambda i: len(completions[i]))
    scores = [0.0] * len(completions)
    for rank, i in enumerate(order):
        scores[i] = rank / max(len(completions) - 1, 1)
    return scores

def batch_size(prompts, completions, **kw):
    return [float(len(completions))] * len(completions)

def shapes(prompts, completions, completion_ids=None, trainer_state=None, answer=None, **columns):
    # 1 per check passed: conversational form, ids as lists of ints, columns as lists, state passed on
    out = []
    for i, c in enumerate(completions):
        conv = isinstance(prompts[i], list)
        form = c == [{"role": "assistant", "content": "hi"}] if conv else c == "hi"
        ids = completion_ids is not None and all(type(t) is int for t in completion_ids[i])
        cols = isinstance(answer, list) and isinstance(columns.get("extra"), list)
        out.append(float(form) + float(ids) + float(cols) + float(trainer_state == {"global_step": 3}))
    return out

def first_only(prompts, completions, **kw):
    # returns one score for the whole batch (a per-completion function): right only one by one
    return [float(len(completions[0]))]
"""


@pytest.fixture()
def user_file(tmp_path):
    f = tmp_path / "user_rewards.py"
    f.write_text(USER)
    return f


def test_builtin_exact_match_and_math_verify():
    scorer = RewardScorer(["exact_match", "math_verify"], "exact_match", None, 20.0)
    try:
        exs = [Example("q", "0359"), Example("q", "\\frac{1}{2}"), Example("q", "42")]
        s = scorer.score(exs, [" 0359\n", "so the answer is $\\boxed{0.5}$", "41"])
        assert s.per_function["exact_match"] == [1.0, 0.0, 0.0]
        assert s.per_function["math_verify"] == [1.0, 1.0, 0.0]
        assert s.total == [2.0, 1.0, 0.0]
        assert s.correct == [True, False, False]  # correctness = the first function
        assert (s.errors, s.timeouts) == (0, 0)
    finally:
        scorer.close()


def test_last_number_rejects_the_restated_question_that_math_verify_accepts():
    """math-verify evaluates arithmetic, so "2 + 6" parses to 8: a policy on chat_addition that only
    restates the question scores 1 (SmolLM2 learned exactly that within 12 steps). last_number
    scores the last number of the reply, and is chat_addition's reward."""
    from mhpo.rewards.functions import last_number
    from mhpo.tasks.procedural import PROCEDURAL

    replies = ["2 + 6", "2 + 6 = 2 + 6", "2 + 6 = 8.", "$\\boxed{8}$", "The sum is 8, not 9", "8 apples", "-8", "x"]
    scorer = RewardScorer(["math_verify", "last_number"], "exact_match", None, 20.0)
    try:
        s = scorer.score([Example("What is 2 + 6?", "8")] * len(replies), replies)
        assert s.per_function["math_verify"][:3] == [1.0, 1.0, 1.0]  # the pitfall
        assert s.per_function["last_number"] == [0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    finally:
        scorer.close()
    assert last_number(None, ["1,024 and 5-3", "a total of 2.50", "-3"], ["3", "2.5", "-3"]) == [1.0, 1.0, 1.0]
    assert PROCEDURAL["chat_addition"].reward == "last_number"
    with pytest.raises(ValueError, match="gold answer 'abc' is not a number; use exact_match or math_verify"):
        last_number(None, ["1"], ["abc"])


def test_hanging_function_times_out_scores_zero_and_the_rest_is_still_scored(user_file):
    scorer = RewardScorer([f"{user_file}:hang_on_hang", f"{user_file}:pid"], "exact_match", None, 0.5)
    try:
        scorer.check()
        exs = [Example("q", "a")] * 4
        t0 = time.monotonic()
        s = scorer.score(exs, ["ok", "hang", "ok", "hang"])
        assert time.monotonic() - t0 < 10
        assert s.per_function["hang_on_hang"] == [1.0, 0.0, 1.0, 0.0]
        assert s.timeouts == 2 and s.errors == 0
        # the batch call ran over (4 x 0.5 s), then one by one: the hung worker was killed 1 + 2 times
        assert scorer.worker.restarts == 3
        assert s.fallbacks == ["hang_on_hang: batch call failed (TimeoutError: no result within 2 s)"]
        assert any("TimeoutError" in m for m in s.messages)
        worker = int(s.per_function["pid"][0])
        assert worker != os.getpid()  # scoring runs in another process
    finally:
        scorer.close()


def test_raising_and_malformed_functions_score_zero_and_are_counted(user_file):
    scorer = RewardScorer([f"{user_file}:raise_on_boom", f"{user_file}:malformed"], "exact_match", [1.0, 0.5], 5.0)
    try:
        s = scorer.score([Example("q", "x")] * 3, ["x", "boom", "y"])
        assert s.per_function["raise_on_boom"] == [1.0, 0.0, 0.0]
        assert s.per_function["malformed"] == [0.0, 0.0, 1.0]  # NaN and a string score 0 and are counted
        assert s.errors == 1 + 2 and s.timeouts == 0
        assert s.failures == {"raise_on_boom": 1, "malformed": 2}
        assert "RuntimeError: kaboom" in " ".join(s.messages)
        assert s.total == [1.0, 0.0, 0.5]
        # the batch raised, so it was scored one by one; malformed's batch result was used as it was
        assert s.fallbacks == ["raise_on_boom: batch call failed (RuntimeError: kaboom)"]
    finally:
        scorer.close()


def test_trl_signature_receives_prompts_and_extra_columns(user_file):
    scorer = RewardScorer([f"{user_file}:echo_columns"], "exact_match", None, 5.0)
    try:
        s = scorer.score([Example("p", "a", {"extra": "abc"}), Example("q", "a", {"extra": ""})], ["c1", "c2"])
        assert s.per_function["echo_columns"] == [4.0, 0.0]
    finally:
        scorer.close()


def test_reasoning_gym_scorer_uses_the_answer_tag_and_the_entry():
    import reasoning_gym

    entry = reasoning_gym.create_dataset("leg_counting", size=1, seed=3)[0]
    scorer = RewardScorer(["reasoning_gym"], "exact_match", None, 30.0)
    try:
        ex = Example(entry["question"], entry["answer"], {"entry": entry})
        right = f"I count. <answer>{entry['answer']}</answer>"
        s = scorer.score([ex, ex, ex], [right, entry["answer"], "<answer>-1</answer>"])
        assert s.per_function["reasoning_gym"][:2] == [1.0, 1.0]
        assert s.per_function["reasoning_gym"][2] < 1.0
    finally:
        scorer.close()


def test_countdown_scorer_that_hangs_on_huge_powers_is_cut_off():
    """reasoning-gym's countdown scorer evaluates the expression: 9**9**9 never finishes."""
    import reasoning_gym

    entry = reasoning_gym.create_dataset("countdown", size=1, seed=1)[0]
    scorer = RewardScorer(["reasoning_gym"], "exact_match", None, 2.0)
    try:
        ex = Example(entry["question"], entry["answer"], {"entry": entry})
        s = scorer.score([ex, ex], ["9**9**9", entry["answer"]])
        assert s.per_function["reasoning_gym"] == [0.0, 1.0]
        assert s.timeouts == 1
    finally:
        scorer.close()


def test_resolution_and_load_errors(user_file):
    assert resolve(["auto"], "reasoning_gym")[0][0] == "reasoning_gym"
    with pytest.raises(ValueError, match="twice"):
        resolve(["exact_match", "exact_match"], "exact_match")
    with pytest.raises(ValueError, match="file .* does not exist"):
        resolve(["/no/such.py:fn"], "exact_match")
    scorer = RewardScorer([f"{user_file}:nope"], "exact_match", None, 5.0)
    try:
        with pytest.raises(ValueError, match="has no attribute 'nope'"):
            scorer.check()
    finally:
        scorer.close()


def test_timeout_worker_that_dies_costs_one_call(tmp_path):
    f = tmp_path / "die.py"
    f.write_text("import os\ndef f(x):\n    if x == 1:\n        os._exit(3)\n    return x * 2\n")
    with TimeoutWorker([f"{f}:f"], timeout_s=5.0) as box:
        out = box.map(0, [((0,), {}), ((1,), {}), ((2,), {})])
        assert [o.value for o in out] == [0, None, 4]
        assert "WorkerDied" in out[1].error and not out[1].timed_out


# -- TRL's calling convention: once per batch --------------------------------------------------------------


def test_each_function_is_called_once_per_batch_so_group_relative_rewards_work(user_file):
    scorer = RewardScorer([f"{user_file}:rank_in_batch", f"{user_file}:batch_size"], "exact_match", None, 5.0)
    try:
        s = scorer.score([Example("q", "a")] * 4, ["ccc", "a", "dddd", "bb"])
        assert s.per_function["rank_in_batch"] == [2 / 3, 0.0, 1.0, 1 / 3]  # one by one, every rank would be 0
        assert s.per_function["batch_size"] == [4.0] * 4
        assert s.fallbacks == [] and (s.errors, s.timeouts) == (0, 0)
    finally:
        scorer.close()


def test_completions_ids_columns_and_state_come_in_trls_form(user_file):
    import numpy as np

    scorer = RewardScorer([f"{user_file}:shapes"], "exact_match", None, 5.0)
    try:
        chat = [{"role": "user", "content": "say hi"}]
        exs = [Example(chat, "hi", {"extra": "x"}), Example("say hi", "hi", {"extra": "y"})]
        ids = [np.array([5, 6], dtype=np.int64), (7,)]  # any sequence of ints arrives as a list of ints
        s = scorer.score(exs, ["hi", "hi"], completion_ids=ids, trainer_state={"global_step": 3})
        assert s.per_function["shapes"] == [4.0, 4.0]
        s = scorer.score(exs, ["hi", "hi"])  # without ids: completion_ids is not passed
        assert s.per_function["shapes"] == [2.0, 2.0]
        with pytest.raises(ValueError, match="2 examples, 2 completions, 1 completion_ids; need one each"):
            scorer.score(exs, ["hi", "hi"], completion_ids=[[1]])
    finally:
        scorer.close()


def test_a_batch_result_of_the_wrong_length_falls_back_to_one_by_one(user_file):
    scorer = RewardScorer([f"{user_file}:first_only"], "exact_match", None, 5.0)
    try:
        s = scorer.score([Example("q", "a")] * 3, ["a", "bb", "ccc"])
        assert s.per_function["first_only"] == [1.0, 2.0, 3.0]
        assert (s.errors, s.timeouts) == (0, 0)
        assert s.fallbacks == ["first_only: batch call returned 1 score(s) for 3 completions"]
    finally:
        scorer.close()


def test_builtins_score_conversational_batches():
    from mhpo.rewards.functions import completion_text, exact_match, last_number

    chat = [{"role": "user", "content": "What is 2 + 6?"}]
    scorer = RewardScorer(["last_number", "exact_match"], "exact_match", None, 20.0)
    try:
        s = scorer.score([Example(chat, "8")] * 3, ["2 + 6 = 8", "8", "9"])
        assert s.per_function["last_number"] == [1.0, 1.0, 0.0]
        assert s.per_function["exact_match"] == [0.0, 1.0, 0.0]
    finally:
        scorer.close()
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "8"}]}]
    assert completion_text(parts) == "8" and exact_match(None, [parts], ["8"]) == [1.0]
    assert last_number(None, [[{"role": "assistant", "content": "so 8"}]], ["8"]) == [1.0]
