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

from collections.abc import Sequence

import torch

from mhpo.evaluation.metrics import pass_at_k
from mhpo.generation.policy import LoadedPolicy
from mhpo.generation.rollout import sample
from mhpo.rewards import RewardScorer
from mhpo.seeding import seeded
from mhpo.tasks.base import Example


@torch.no_grad()
def evaluate(
    policy: LoadedPolicy,
    scorer: RewardScorer,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    pass_k: int,
    temperature: float,
    batch_size: int,
    seed: int,
) -> tuple[dict[str, float], list[dict]]:
    """(results, samples): the metrics above and one record per example (greedy completion). Runs in
    the caller's autocast (``with policy.autocast():``)."""
    model, tokenizer, encoder, eos_ids = policy.model, policy.tokenizer, policy.encoder, policy.eos_ids
    device = policy.device
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
