"""`mhpo eval --benchmarks`: the paper's evaluation protocol on the standard math benchmarks.

    specs       named benchmarks (hub id, split, columns), local files       (:mod:`.specs`)
    loading     rows -> Problems (instruction template, gold, image, choices) (:mod:`.loading`)
    answers     answer extraction + math-verify scoring (runs in the worker)  (:mod:`.answers`)
    scoring     the parent side: the hard-killed scorer worker               (:mod:`.scoring`)
    metrics     Avg@k, unbiased pass@k, maj@k, macro average (pure)          (:mod:`.metrics`)
    protocol    sampling K per problem, samples.jsonl, resume                (:mod:`.protocol`)
    report      summary.json / summary.md                                    (:mod:`.report`)
    runner      load model + benchmarks + scorer, run                        (:mod:`.runner`)
    training    the hook of ``eval.benchmarks`` during ``mhpo train``        (:mod:`.training`)

See docs/evaluation.md.
"""

from mhpo.evaluation.loading import DEFAULT_TEMPLATE, Problem, load_problems
from mhpo.evaluation.metrics import TIE_RULE, avg_at_k, majority, pass_at_k, report_ks
from mhpo.evaluation.specs import BENCHMARKS, BenchmarkSpec, benchmark_names, get_spec

__all__ = [
    "BENCHMARKS",
    "BenchmarkSpec",
    "benchmark_names",
    "get_spec",
    "DEFAULT_TEMPLATE",
    "Problem",
    "load_problems",
    "TIE_RULE",
    "avg_at_k",
    "majority",
    "pass_at_k",
    "report_ks",
]
