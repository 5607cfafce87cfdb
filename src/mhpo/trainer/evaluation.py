"""Held-out evaluation: greedy accuracy and pass@k by sampling, on a fixed set of examples.

    greedy/accuracy   fraction of prompts whose greedy completion is correct
    pass@k            fraction of prompts with at least one correct completion among k samples
                      (n = k samples per prompt, so the unbiased estimator 1 - C(n-c, k) / C(n, k)
                      reduces to "any correct")
    sample/accuracy   fraction of the k * prompts samples that are correct (an estimate of pass@1)

Sampling for pass@k runs under a forked RNG seeded by ``seed``: it is reproducible and leaves the
training RNG untouched (so evaluating does not change the training run).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from mhpo.rewards import RewardScorer
from mhpo.tasks.base import Example
from mhpo.trainer.rollout import PromptEncoder, sample


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n - c, k) / C(n, k) (computed as a
    running product, :func:`mhpo.benchmarks.metrics.pass_at_k`)."""
    from mhpo.benchmarks.metrics import pass_at_k as estimator

    return estimator(n, c, k)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Run a block under a private torch RNG seeded with ``seed`` (the outer state is restored)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    encoder: PromptEncoder,
    scorer: RewardScorer,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pass_k: int,
    temperature: float,
    batch_size: int,
    seed: int,
) -> tuple[dict[str, float], list[dict]]:
    """(results, samples): the metrics above and one record per example (greedy completion)."""
    device = next(model.parameters()).device
    prompts = encoder(examples)
    greedy = sample(
        model,
        tokenizer,
        prompts,
        group_size=1,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        batch_size=batch_size,
    )
    scores = scorer.score(examples, greedy.completions)
    n = len(examples)
    results = {
        "greedy/accuracy": sum(scores.correct) / n,
        "greedy/reward": sum(scores.total) / n,
        "greedy/length": float(greedy.lengths.float().mean()),
        "reward/errors": float(scores.errors),
        "reward/timeouts": float(scores.timeouts),
    }
    if pass_k > 0:
        with seeded(seed, device):
            sampled = sample(
                model,
                tokenizer,
                prompts,
                group_size=pass_k,
                do_sample=True,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                eos_ids=eos_ids,
                batch_size=batch_size,
            )
        rows = [ex for ex in examples for _ in range(pass_k)]
        s = scorer.score(rows, sampled.completions)
        per_prompt = [sum(s.correct[i * pass_k : (i + 1) * pass_k]) for i in range(n)]
        results[f"pass@{pass_k}"] = sum(pass_at_k(pass_k, c, pass_k) for c in per_prompt) / n
        results["sample/accuracy"] = sum(s.correct) / len(rows)
        results["reward/errors"] += s.errors
        results["reward/timeouts"] += s.timeouts
    records = [
        {"prompt": encoder.render(ex), "answer": ex.answer, "completion": c, "correct": bool(ok), "reward": r}
        for ex, c, ok, r in zip(examples, greedy.completions, scores.correct, scores.total)
    ]
    return results, records
