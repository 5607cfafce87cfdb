"""Benchmarks during training: ``eval.benchmarks`` evaluated at every evaluation of ``mhpo train``.

    eval.benchmarks: [gsm8k, data/mine.jsonl]   # names or local files (as mhpo eval --benchmarks)
    eval.benchmark_samples: 4                   # K samples per problem
    eval.benchmark_limit: 50                    # first N problems of each (null: all)
    eval.benchmark_max_new_tokens: null         # null: the run's max_new_tokens
    eval.benchmark_data_dir: null               # local copies of named benchmarks (--data-dir)

At each evaluation (before RL, every ``eval.every`` steps, after RL) the policy samples K
completions per problem with temperature ``eval.temperature``, top-p 1, the default boxed-answer
instruction and answer extraction, under private RNGs seeded from ``eval.seed`` (the training RNG
is untouched, so a run with benchmarks trains exactly like one without). The results go into the
same evals.jsonl line and TensorBoard step as the held-out accuracy, as

    bench/<name>/avg@K, bench/<name>/pass@k (k = 1, 2, 4, ..., K), bench/<name>/maj@K,
    bench/<name>/no_answer_rate, bench/<name>/truncation_rate, bench/<name>/mean_length,
    bench/macro/avg@K, ...

and the rows (as mhpo eval's samples.jsonl) into ``samples/benchmarks_step_N.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path

from mhpo.evaluation.loading import DEFAULT_TEMPLATE
from mhpo.evaluation.metrics import benchmark_metrics, macro_average
from mhpo.evaluation.protocol import Generator, Settings, batch_seed, batches, sample_rows
from mhpo.evaluation.report import RENAME
from mhpo.evaluation.scoring import AnswerScorer
from mhpo.evaluation.specs import get_spec


def check_config(eval_cfg) -> None:
    """ValueError for an unknown benchmark name or a missing file (before any model loads)."""
    for name in eval_cfg.benchmarks:
        get_spec(str(name))


class BenchmarkHook:
    """``hook(model, tokenizer, encoder, eos_ids, step) -> {bench/...: value}``; ``close()`` at the end."""

    def __init__(self, eval_cfg, run_dir: str | Path, *, max_new_tokens: int, timeout_s: float = 10.0):
        from mhpo.evaluation.runner import load_benchmarks

        self.settings = Settings(
            samples=eval_cfg.benchmark_samples,
            temperature=eval_cfg.temperature,
            top_p=1.0,
            max_new_tokens=eval_cfg.benchmark_max_new_tokens or max_new_tokens,
            seed=eval_cfg.seed,
            template=DEFAULT_TEMPLATE,
            batch_size=eval_cfg.batch_size,
        )
        self.specs, self.problems = load_benchmarks(
            [str(b) for b in eval_cfg.benchmarks],
            template=DEFAULT_TEMPLATE,
            data_dir=eval_cfg.benchmark_data_dir,
            limit=eval_cfg.benchmark_limit,
        )
        self.run_dir = Path(run_dir)
        self.scorer = AnswerScorer(self.settings.answer_extraction, timeout_s)

    def __call__(self, model, tokenizer, encoder, eos_ids, step: int) -> dict[str, float]:
        gen = Generator(model, tokenizer, encoder, list(eos_ids))
        per, rows_all = {}, []
        for name, probs in self.problems.items():
            rows = []
            for start, chunk in batches(probs, self.settings):
                rows += sample_rows(gen, chunk, self.settings, self.scorer, batch_seed(self.settings, name, start))
            per[name] = {RENAME.get(k, k): v for k, v in benchmark_metrics(rows, self.settings.ks).items()}
            rows_all += rows
        out = {f"bench/{name}/{k}": v for name, m in per.items() for k, v in m.items()}
        if len(per) > 1:
            out.update({f"bench/macro/{k}": v for k, v in macro_average(per).items()})
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "samples" / f"benchmarks_step_{step:06d}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows_all))
        return out

    def close(self) -> None:
        self.scorer.close()


def open_hook(cfg, run_dir: str | Path, max_new_tokens: int) -> BenchmarkHook | None:
    """The hook of a run config (None when ``eval.benchmarks`` is empty)."""
    if not cfg.eval.benchmarks:
        return None
    return BenchmarkHook(cfg.eval, run_dir, max_new_tokens=max_new_tokens, timeout_s=cfg.rewards.timeout_s)
