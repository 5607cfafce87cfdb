"""The estimators of the evaluation protocol, as pure functions of per-sample scores and answers.

For one problem with n samples, scores s_1..s_n in [0, 1], c of them correct (s_i >= 1 - 1e-6):

    Avg@n    = (1/n) sum_i s_i                                   (the MHPO paper's metric, n = 32)
    pass@k   = 1 - C(n - c, k) / C(n, k)
             = 1 - prod_{i = n-c+1..n} (1 - k / i)               (Chen et al. 2021; needs k <= n)
    maj@n    = score of the majority answer (answers compared by their parsed canonical form);
               TIE RULE: among the answers with the highest count, the one whose first occurrence
               comes earliest in sample order wins; samples without a parsable answer do not vote;
               no parsable answer at all scores 0

and every metric of a benchmark is the unweighted mean over its problems; the ``macro`` entry is
the unweighted mean over benchmarks (the paper's "Avg" column).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

CORRECT_AT = 1.0 - 1e-6
TIE_RULE = (
    "majority over parsed answers (no-answer samples do not vote); ties go to the answer "
    "whose first occurrence comes earliest; no parsable answer scores 0"
)


def is_correct(score: float) -> bool:
    return score >= CORRECT_AT


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k, 1 - prod_{i=n-c+1..n} (1 - k/i); ValueError unless 1 <= k <= n, 0 <= c <= n."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs at least k samples per problem, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"c={c} correct samples out of n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(scores: Sequence[float]) -> float:
    """(1/n) sum_i s_i."""
    if not scores:
        raise ValueError("Avg@k of no samples")
    return sum(scores) / len(scores)


def majority(keys: Sequence[str | None], scores: Sequence[float]) -> tuple[str | None, float]:
    """(winning answer key, its score) by :data:`TIE_RULE`; (None, 0.0) when no key is set.

    The score is the one of the winner's first occurrence (samples with equal keys score alike).
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None, 0.0
    winner = min(counts, key=lambda k: (-counts[k], first[k]))
    return winner, float(scores[first[winner]])


def report_ks(samples: int, requested: Iterable[int] | None = None) -> list[int]:
    """The k of pass@k: ``requested`` (checked <= samples), else 1, 2, 4, ... and ``samples`` itself."""
    if requested:
        ks = sorted(set(int(k) for k in requested))
        bad = [k for k in ks if k < 1 or k > samples]
        if bad:
            raise ValueError(
                f"pass@{bad[-1]} needs at least {bad[-1]} samples per problem, but --samples is {samples}; "
                f"raise --samples or ask for k <= {samples}"
            )
        return ks
    ks, k = [], 1
    while k <= samples:
        ks.append(k)
        k *= 2
    if ks[-1] != samples:
        ks.append(samples)
    return ks


def problem_metrics(row: Mapping, ks: Sequence[int]) -> dict[str, float]:
    """Metrics of one samples.jsonl row (scores, parsed, lengths, truncated; optional greedy_score)."""
    scores, keys = list(row["scores"]), list(row["parsed"])
    n = len(scores)
    c = sum(is_correct(s) for s in scores)
    out = {f"avg@{n}": avg_at_k(scores), f"maj@{n}": majority(keys, scores)[1]}
    out.update({f"pass@{k}": pass_at_k(n, c, k) for k in ks})
    out["no_answer"] = sum(k is None for k in keys) / n
    out["truncated"] = sum(bool(t) for t in row["truncated"]) / n
    out["length"] = sum(row["lengths"]) / n
    if row.get("greedy_score") is not None:
        out["greedy"] = float(row["greedy_score"])
    return out


def benchmark_metrics(rows: Sequence[Mapping], ks: Sequence[int]) -> dict[str, float]:
    """Mean of :func:`problem_metrics` over the rows (one per problem, all with n samples)."""
    if not rows:
        raise ValueError("no problems to summarise")
    per = [problem_metrics(r, ks) for r in rows]
    return {key: sum(p[key] for p in per) / len(per) for key in per[0]}


def macro_average(per_benchmark: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean over benchmarks of every metric that all of them have."""
    tables = list(per_benchmark.values())
    if not tables:
        return {}
    keys = [k for k in tables[0] if all(k in t for t in tables)]
    return {k: sum(t[k] for t in tables) / len(tables) for k in keys}
