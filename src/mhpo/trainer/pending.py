"""Scored batches waiting for their update: asynchronous RL emulated exactly (``rollout.staleness``).

With staleness k the batch trained on at RL step t was sampled k steps earlier, by the weights after
step t - k - 1 (clipped at the RL-initial weights), and its behaviour log-probs are those weights'
(computed when it was sampled, as an asynchronous engine's sampler reports them), so no weight copy
is kept:

    step t:  sample the batches for steps next .. min(t + k, train.steps)  (current weights)
             train on the batch for step t                                  (sampled at step t - k)

The first step samples the batches for steps 1 .. k + 1 with the RL-initial weights: the pipeline
fills as an asynchronous run's does (policy lag min(t - 1, k) RL steps), ``train.steps`` counts
updates as with k = 0, and the last k steps sample nothing. The batches not yet trained on are
part of every checkpoint (``pending.safetensors`` + the state's JSON), so a resume is exact.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field

import torch

from mhpo.generation.rollout import Rollout
from mhpo.rewards import Scores


@dataclass
class ScoredBatch:
    """One sampled, scored batch and its behaviour log-probs, before its update."""

    target: int  # the RL step that trains on it
    sampled_after: int  # RL steps done when it was sampled (its weights: those after that step)
    sampled_optimizer_steps: int  # optimizer steps done when it was sampled
    rollout: Rollout  # N rows
    scores: Scores
    rewards: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]
    keep: torch.Tensor  # [N] bool: rows in the update
    old_logp: torch.Tensor  # [N, C] behaviour log-probs (rows of first_epoch[0] filled by the update)
    entropy: torch.Tensor | None  # [N, C], None when no trainer pass computed it
    first_epoch: list[torch.Tensor] | None = None  # k = 0, trainer log-probs: drawn minibatches (see update.py)
    metrics: dict[str, float] = field(default_factory=dict)  # measured when sampled (e.g. the mismatch)


def next_target(pending: deque[ScoredBatch], step: int) -> int:
    """The first RL step that has no batch yet, at RL step ``step``."""
    return pending[-1].target + 1 if pending else step


_TENSORS = ("rewards", "advantages", "keep", "old_logp", "entropy")
_ROLLOUT = ("input_ids", "attention_mask", "completion_mask", "logprobs")


def to_state(pending: deque[ScoredBatch]) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """(JSON records, tensors named '<i>/<field>') of the pending batches, for a checkpoint.
    Text batches only: a batch with extra model inputs (images) raises ValueError."""
    records, tensors = [], {}
    for i, b in enumerate(pending):
        if b.rollout.model_inputs:
            raise ValueError("rollout.staleness > 0 keeps text batches only (this one has image inputs)")
        for name in _TENSORS:
            if getattr(b, name) is not None:
                tensors[f"{i}/{name}"] = getattr(b, name).clone()  # own storage: fields may share one
        for name in _ROLLOUT:
            if getattr(b.rollout, name) is not None:
                tensors[f"{i}/rollout.{name}"] = getattr(b.rollout, name).clone()
        records.append(
            {
                "target": b.target,
                "sampled_after": b.sampled_after,
                "sampled_optimizer_steps": b.sampled_optimizer_steps,
                "prompt_width": b.rollout.prompt_width,
                "completions": b.rollout.completions,
                "scores": dataclasses.asdict(b.scores),
                "metrics": b.metrics,
            }
        )
    return records, tensors


def from_state(records: list[dict], tensors: dict[str, torch.Tensor]) -> deque[ScoredBatch]:
    """The inverse of :func:`to_state`."""
    out = deque()
    for i, r in enumerate(records):
        t = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{i}/")}
        rollout = Rollout(
            t["rollout.input_ids"],
            t["rollout.attention_mask"],
            t["rollout.completion_mask"],
            r["prompt_width"],
            {},
            r["completions"],
            logprobs=t.get("rollout.logprobs"),
        )
        out.append(
            ScoredBatch(
                r["target"],
                r["sampled_after"],
                r["sampled_optimizer_steps"],
                rollout,
                Scores(**r["scores"]),
                t["rewards"],
                t["advantages"],
                t["keep"],
                t["old_logp"],
                t.get("entropy"),
                None,
                r["metrics"],
            )
        )
    return out


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """Optimizer steps taken so far (AdamW's per-parameter step count; 0 before the first)."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0
