"""The policy update: log-probs of a rollout under a model, and minibatch optimizer steps.

Per RL step the rollout batch (N rows) is used ``epochs`` times; each epoch shuffles the rows and
splits them into ``num_minibatches`` minibatches, one optimizer step each (so from the second step
on, the ratio r = pi / pi_behaviour leaves 1 and the objective's ratio control matters). A minibatch
runs in micro-batches whose losses use the minibatch's global counts, so their gradients sum to the
full-minibatch gradient exactly:

    loss_mb = sum_micro policy_loss(..., num_tokens=N_tok(mb), num_seqs=N_seq(mb))
    g = clip(grad loss_mb, max_grad_norm);  AdamW step
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .aggregation import global_counts
from .diagnostics import log_ratio_order_stats, masked_log_ratio
from .logprobs import model_logprobs
from .loss import policy_loss
from .multimodal import model_kwargs
from .rollout import Rollout, forward_inputs


def rollout_logprobs(
    model,
    rollout: Rollout,
    *,
    temperature: float,
    entropy: bool = False,
    micro_batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # ([N, C] float32, [N, C] | None), zero off-mask
    """Log-probs (and entropy) of every completion token, without gradients, in micro-batches."""
    n, C = rollout.completion_mask.shape
    logp = torch.zeros(n, C, dtype=torch.float32)
    ent = torch.zeros(n, C, dtype=torch.float32) if entropy else None
    step = micro_batch_size or n
    with torch.no_grad():
        for s in range(0, n, step):
            rows = torch.arange(s, min(s + step, n))
            part = rollout.select(rows)
            lp, e = _forward(model, part, temperature, entropy)
            w = lp.shape[1]
            logp[rows, :w] = lp.float().cpu() * part.completion_mask
            if entropy:
                ent[rows, :w] = e.float().cpu() * part.completion_mask
    return logp, ent


def _forward(model, part: Rollout, temperature: float, entropy: bool):
    device = next(model.parameters()).device
    ids, attn = part.input_ids.to(device), part.attention_mask.to(device)
    extra = model_kwargs(forward_inputs(part), ids, attn, device)
    return model_logprobs(model, ids, attn, part.prompt_width, temperature=temperature, entropy=entropy,
                          share_prompts=True, **extra)


@dataclass
class UpdateBatch:
    """What the update needs from one RL step (rows already filtered)."""

    rollout: Rollout
    old_logp: torch.Tensor  # [N, C] behaviour log-probs
    advantages: torch.Tensor  # [N]
    ref_logp: torch.Tensor | None = None  # [N, C] reference log-probs (KL)
    # With fill_first, the rows of the first minibatch have no old_logp (nor entropy) yet: before the
    # first optimizer step the policy IS the behaviour policy, so its forward pass gives them
    # (written into old_logp and entropy in place) and no separate pass is needed for those rows.
    fill_first: bool = False
    entropy: torch.Tensor | None = None  # [N, C], filled for the first minibatch's rows with fill_first


def minibatches(n: int, num_minibatches: int) -> list[torch.Tensor]:
    """One epoch's minibatches: a random permutation of range(n) (global generator) in
    min(num_minibatches, n) near-equal parts."""
    if n == 0:
        return []
    return list(torch.tensor_split(torch.randperm(n), min(num_minibatches, n)))


def policy_update(
    model,
    optimizer: torch.optim.Optimizer,
    batch: UpdateBatch,
    *,
    objective: str,
    hparams: Mapping[str, Any],
    agg: str,
    beta: float,
    num_minibatches: int,
    epochs: int,
    micro_batch_size: int | None,
    max_grad_norm: float,
    temperature: float,
    norm_length: float,
    first_epoch: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Run the optimizer steps of one RL step; returns averaged objective stats and grad norms.

    Minibatch order comes from ``torch.randperm`` on the global generator (saved in checkpoints);
    ``first_epoch`` passes the first epoch's minibatches when the caller drew them already
    (:func:`minibatches`, e.g. to know which rows ``fill_first`` covers).
    """
    n = len(batch.rollout)
    if n == 0:
        return {"update/optimizer_steps": 0.0}
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    per_step: list[dict[str, float]] = []
    norms: list[float] = []
    model.train()
    for epoch in range(epochs):
        splits = first_epoch if epoch == 0 and first_epoch is not None else minibatches(n, num_minibatches)
        for i, mb in enumerate(splits):
            fill = batch.fill_first and epoch == 0 and i == 0
            mask_mb = batch.rollout.completion_mask[mb]
            counts = global_counts(mask_mb)
            if counts["num_tokens"] == 0:
                continue
            optimizer.zero_grad(set_to_none=True)
            micro_stats, micro_lr = [], []
            micros = torch.split(mb, micro_batch_size or len(mb))
            for micro in micros:
                part = batch.rollout.select(micro)
                w = part.completion_mask.shape[1]
                logp, ent = _forward(model, part, temperature, fill and batch.entropy is not None)  # [b, w]
                mask = part.completion_mask.to(device)
                if fill:  # the behaviour log-probs of these rows are this very forward pass
                    batch.old_logp[micro, :w] = logp.detach().float().cpu() * part.completion_mask
                    if ent is not None:
                        batch.entropy[micro, :w] = ent.detach().float().cpu() * part.completion_mask
                ref = batch.ref_logp[micro, :w].to(device) if batch.ref_logp is not None else None
                old = batch.old_logp[micro, :w].to(device=device, dtype=logp.dtype)
                if len(micros) > 1:  # the step's percentiles are taken over all its micro-batches' tokens
                    micro_lr.append(masked_log_ratio(logp, old, mask).cpu())
                loss, stats = policy_loss(
                    objective,
                    logp,
                    old,
                    batch.advantages[micro].to(device=device, dtype=logp.dtype),
                    mask,
                    agg=agg,
                    ref_logp=ref.to(logp.dtype) if ref is not None else None,
                    beta=beta,
                    num_tokens=counts["num_tokens"],
                    num_seqs=counts["num_seqs"],
                    norm_length=norm_length,
                    **hparams,
                )
                loss.backward()
                micro_stats.append(stats)
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            norms.append(float(norm))
            per_step.append(combine_micro(micro_stats, torch.cat(micro_lr) if micro_lr else None))
    optimizer.zero_grad(set_to_none=True)
    out = mean_stats(per_step)
    out = {f"policy/{k}": v for k, v in out.items()}
    if norms:
        out["grad_norm"] = sum(norms) / len(norms)
        out["grad_norm/max"] = max(norms)
    out["update/optimizer_steps"] = float(len(norms))
    return out


_MAX_KEYS = ("ratio/max", "ratio/p99")
_MIN_KEYS = ("ratio/min", "ratio/p1")
_SUM_KEYS = ("loss", "tokens")


def combine_micro(stats: list[dict[str, float]], log_ratios: torch.Tensor | None = None) -> dict[str, float]:
    """One optimizer step's stats from its micro-batches: loss and tokens summed, the rest
    token-weighted means, and the ratio's min / max / p1 / p99 and |log r| p99 recomputed exactly
    over all the step's masked tokens when ``log_ratios`` (their log r, concatenated) is given;
    without it, min / max are exact and p1 / p99 are the extreme micro-batch's (a bound, not the
    step's percentile)."""
    if len(stats) == 1:
        return dict(stats[0])
    total = sum(s.get("tokens", 0.0) for s in stats) or 1.0
    out: dict[str, float] = {}
    for key in stats[0]:
        values = [s[key] for s in stats if key in s]
        if key in _SUM_KEYS:
            out[key] = sum(values)
        elif key in _MAX_KEYS:
            out[key] = max(values)
        elif key in _MIN_KEYS:
            out[key] = min(values)
        else:
            out[key] = sum(s[key] * s.get("tokens", 0.0) for s in stats if key in s) / total
    if log_ratios is not None and "ratio/p99" in out:
        out.update(log_ratio_order_stats(log_ratios))
    return out


def mean_stats(stats: list[dict[str, float]]) -> dict[str, float]:
    """One RL step's stats from its optimizer steps: ratio min / p1 as the minimum and max / p99
    as the maximum over the optimizer steps (the most extreme step's exact percentile: each step
    has its own policy, so no single percentile covers them), the rest as means."""
    keys = dict.fromkeys(k for s in stats for k in s)
    out = {}
    for k in keys:
        values = [s[k] for s in stats if k in s]
        if k in _MAX_KEYS:
            out[k] = max(values)
        elif k in _MIN_KEYS:
            out[k] = min(values)
        else:
            out[k] = sum(values) / len(values)
    return out
