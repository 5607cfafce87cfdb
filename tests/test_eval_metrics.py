"""The estimators of `mhpo eval --benchmarks` (Avg@k, unbiased pass@k, maj@k, macro) and answer
extraction, checked against brute force and hand-made cases."""

from __future__ import annotations

import itertools
import random

import pytest

from mhpo.evaluation.answers import choice_letter, last_boxed, score_completion
from mhpo.evaluation.metrics import (
    avg_at_k,
    benchmark_metrics,
    macro_average,
    majority,
    pass_at_k,
    problem_metrics,
    report_ks,
)


def brute_pass_at_k(correct: list[bool], k: int) -> float:
    """Fraction of all k-subsets of the samples holding at least one correct one."""
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_equals_enumeration_over_all_k_subsets(n):
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        random.Random(n * 31 + c).shuffle(correct)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(correct, k), abs=1e-12), (n, c, k)


def test_pass_at_k_stays_exact_for_large_n():
    from math import comb

    n, c = 64, 3
    for k in (1, 8, 32, 61, 62, 64):
        expected = 1.0 - comb(n - c, k) / comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert pass_at_k(64, 0, 64) == 0.0 and pass_at_k(64, 64, 1) == 1.0
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 = c / n


def test_pass_at_k_needs_k_samples():
    with pytest.raises(ValueError, match="at least k samples"):
        pass_at_k(4, 1, 8)
    with pytest.raises(ValueError, match=r"pass@8 needs at least 8 samples .* --samples is 4"):
        report_ks(4, [1, 8])
    assert report_ks(32) == [1, 2, 4, 8, 16, 32]
    assert report_ks(6) == [1, 2, 4, 6]
    assert report_ks(1) == [1]
    assert report_ks(8, [4, 2, 4]) == [2, 4]


def test_avg_at_k_is_the_mean_score_and_equals_pass_at_1():
    scores = [1.0, 0.0, 1.0, 1.0, 0.0]
    assert avg_at_k(scores) == pytest.approx(0.6)
    assert avg_at_k(scores) == pytest.approx(pass_at_k(5, 3, 1))
    assert avg_at_k([0.5, 1.0]) == pytest.approx(0.75)  # partial scores are averaged, not thresholded
    with pytest.raises(ValueError):
        avg_at_k([])


def test_majority_vote_and_its_tie_rule():
    # clear majority, whatever its position
    assert majority(["3", "5", "5", "3", "5"], [1, 0, 0, 1, 0]) == ("5", 0.0)
    # tie 2-2: the answer whose first occurrence comes first wins
    assert majority(["7", "4", "4", "7"], [0, 1, 1, 0]) == ("7", 0.0)
    assert majority(["4", "7", "7", "4"], [1, 0, 0, 1]) == ("4", 1.0)
    # samples without a parsable answer do not vote, even when they are the most
    assert majority([None, None, None, "2", "9", "2"], [0, 0, 0, 1, 0, 1]) == ("2", 1.0)
    # nothing parsable: no answer, score 0
    assert majority([None, None], [0.0, 0.0]) == (None, 0.0)
    # three-way tie with a later larger group: the larger group wins over earlier singletons
    assert majority(["a", "b", "c", "c"], [0, 0, 1, 1]) == ("c", 1.0)


def _row(scores, parsed, lengths=None, truncated=None, greedy=None):
    n = len(scores)
    row = {"scores": scores, "parsed": parsed, "lengths": lengths or [10] * n, "truncated": truncated or [False] * n}
    if greedy is not None:
        row["greedy_score"] = greedy
    return row


def test_problem_and_benchmark_metrics():
    a = _row(
        [1.0, 0.0, 0.0, 1.0],
        ["1", "2", "2", "1"],
        lengths=[4, 6, 8, 10],
        truncated=[False, True, False, False],
        greedy=1.0,
    )
    b = _row([0.0, 0.0, 0.0, 0.0], [None, "5", None, None], greedy=0.0)
    m = problem_metrics(a, [1, 2, 4])
    assert m["avg@4"] == 0.5 and m["maj@4"] == 1.0  # 1 and 2 tie 2-2; "1" came first
    assert m["pass@1"] == pytest.approx(0.5) and m["pass@2"] == pytest.approx(brute_pass_at_k([1, 0, 0, 1], 2))
    assert m["pass@4"] == 1.0
    assert m["length"] == 7.0 and m["truncated"] == 0.25 and m["no_answer"] == 0.0 and m["greedy"] == 1.0
    mb = problem_metrics(b, [1, 2, 4])
    assert mb["no_answer"] == 0.75 and mb["maj@4"] == 0.0 and mb["pass@4"] == 0.0
    bench = benchmark_metrics([a, b], [1, 2, 4])
    assert bench["avg@4"] == pytest.approx(0.25)
    assert bench["no_answer"] == pytest.approx(0.375)
    assert bench["greedy"] == pytest.approx(0.5)
    macro = macro_average({"x": {"avg@4": 0.2, "only_x": 1.0}, "y": {"avg@4": 0.6}})
    assert macro == {"avg@4": pytest.approx(0.4)}  # unweighted, only metrics every benchmark has


def test_last_boxed_extraction():
    assert last_boxed("so \\boxed{3} then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\sqrt{x^{2}}}") == "\\sqrt{x^{2}}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("\\boxed 5$") == "5"
    assert last_boxed("\\boxed{12} and an unclosed \\boxed{3") == "12"
    assert last_boxed("no box here, the answer is 4") is None
    assert last_boxed("\\boxed{") is None


def test_score_completion_boxed_and_lenient_modes():
    assert score_completion("... = \\boxed{\\frac{3}{4}}", "\\frac{3}{4}")["score"] == 1.0
    assert score_completion("\\boxed{0.75}", "\\frac{3}{4}")["score"] == 1.0  # math-verify equivalence
    assert score_completion("\\boxed{x = 27}", "27.0") == {"answer": "x = 27", "parsed": "27", "score": 1.0}
    wrong = score_completion("\\boxed{5}", "6")
    assert wrong["score"] == 0.0 and wrong["parsed"] == "5"
    none = score_completion("I think the answer is 6", "6")  # boxed mode: no box -> no answer
    assert none == {"answer": None, "parsed": None, "score": 0.0}
    assert score_completion("\\boxed{}", "6")["parsed"] is None  # empty box: no parsable answer
    lenient = score_completion("I think the answer is 6", "6", mode="math-verify")
    assert lenient["score"] == 1.0 and lenient["parsed"] == "6"
    assert score_completion("no numbers at all", "6", mode="math-verify")["parsed"] is None
    assert score_completion("\\boxed{} so it is 6", "6", mode="math-verify") == {
        "answer": "6",
        "parsed": "6",
        "score": 1.0,
    }
    with pytest.raises(ValueError, match="answer extraction"):
        score_completion("x", "1", mode="regex")


def test_score_completion_multiple_choice():
    choices = ["circle", "square", "triangle"]
    assert score_completion("\\boxed{B}", "B", choices=choices)["score"] == 1.0
    assert score_completion("\\boxed{(b)}", "B", choices=choices)["score"] == 1.0
    assert score_completion("\\boxed{\\text{square}}", "B", choices=choices)["parsed"] == "B"
    assert score_completion("\\boxed{D}", "B", choices=choices)["parsed"] is None  # not an option
    assert score_completion("The answer is (B).", "B", choices=choices)["parsed"] is None
    assert score_completion("The answer is (B).", "B", mode="math-verify", choices=choices)["score"] == 1.0
    assert choice_letter("triangle", choices) == "C" and choice_letter("hexagon", choices) is None
