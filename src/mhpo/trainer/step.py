"""One RL step, top to bottom (docs/architecture.md draws it):

    batches due   sample -> score -> group advantages -> behaviour log-probs    (scored_batch, per target step)
    this step's   update_batch (+ reference log-probs) -> policy_update -> lr schedule step
    metrics       rewards, lengths, entropy, groups, the update's stats, staleness, timings

With rollout.staleness = k the batch sampled at step t is trained at step t + k (:mod:`mhpo.trainer.pending`).
"""

from __future__ import annotations

import contextlib
import time

import torch

from mhpo.generation.rollout import sample
from mhpo.trainer.advantages import group_advantages, zero_std_groups
from mhpo.trainer.config import Config
from mhpo.trainer.pending import ScoredBatch, next_target, optimizer_steps
from mhpo.trainer.setup import Plan, Policy
from mhpo.trainer.update import UpdateBatch, minibatches, policy_update, rollout_logprobs


def rl_step(plan: Plan, pol: Policy, source, pending, step: int, hold=contextlib.nullcontext) -> dict[str, float]:
    """RL step ``step``: sample and score the batches now due (:mod:`mhpo.trainer.pending`; with
    rollout.staleness = 0 exactly this step's), then update on this step's batch -> metrics.

    ``pending`` (a deque of ScoredBatch) carries the batches sampled for later steps. ``lr`` in the
    metrics is the rate this step used; the schedule steps after the update. ``hold()`` is entered
    before the update and left to the caller (interrupts are held from there until the caller has
    logged the step: :mod:`mhpo.trainer.interrupts`)."""
    cfg, timer = plan.cfg, StepTimer()
    last = min(step + cfg.rollout.staleness, cfg.train.steps)
    for target in range(next_target(pending, step), last + 1):
        pending.append(scored_batch(plan, pol, source, target, step - 1, timer))
    sb = pending.popleft()
    batch = update_batch(plan, pol, sb, timer)
    hold()
    with timer("update"):
        lr = pol.scheduler.get_last_lr()[0]
        lag = optimizer_steps(pol.optimizer) - sb.sampled_optimizer_steps
        result = policy_update(pol.model, pol.optimizer, batch, cfg.objective, cfg.update)
        pol.scheduler.step()
    if result.first_rows is not None:  # the first minibatch's entropy came from the update's own pass
        sb.entropy[sb.keep.nonzero().squeeze(-1)[result.first_rows]] = result.first_entropy
    staleness = {"staleness/policy_lag": float(step - 1 - sb.sampled_after), "staleness/optimizer_lag": float(lag)}
    return {**step_metrics(plan, pol, sb, lr, result.stats, timer), **staleness}


def scored_batch(plan: Plan, pol: Policy, source, target: int, steps_done: int, timer) -> ScoredBatch:
    """Sample the batch for RL step ``target`` with the current weights, score it, take its group
    advantages and behaviour log-probs (:func:`behaviour_logprobs`)."""
    cfg = plan.cfg
    with timer("rollout"), sampling_precision(cfg, pol):
        examples = source.next(cfg.rollout.prompts_per_step)
        rollout = sample_completions(plan, pol, examples)
    with timer("reward"):
        rows = [ex for ex in examples for _ in range(cfg.rollout.group_size)]
        ids = [row[keep].tolist() for row, keep in zip(rollout.completion_ids, rollout.completion_mask)]
        scores = plan.scorer.score(rows, rollout.completions, completion_ids=ids)
        rewards = torch.tensor(scores.total, dtype=torch.float32)  # [N]
        a = cfg.advantage
        adv, keep = group_advantages(rewards, cfg.rollout.group_size, a.estimator, a.eps, a.drop_zero_std)  # [N]
    with timer("logprobs"):
        old_logp, entropy, first_epoch, metrics = behaviour_logprobs(plan, pol, rollout, keep)
    n_opt = optimizer_steps(pol.optimizer)
    return ScoredBatch(
        target, steps_done, n_opt, rollout, scores, rewards, adv, keep, old_logp, entropy, first_epoch, metrics
    )


def sampling_precision(cfg: Config, pol: Policy):
    """The autocast of sampling: the run's (rollout.precision=same), or float32 / bf16 regardless."""
    device = next(pol.model.parameters()).device
    if cfg.rollout.precision == "same":
        return contextlib.nullcontext()  # rl_step runs under the run's autocast already
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=cfg.rollout.precision == "bf16", cache_enabled=False
    )


class StepTimer:
    """``with timer("phase"):`` records the phase's wall seconds; ``timer.total`` is their sum."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, phase: str):
        @contextlib.contextmanager
        def timed():
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

        return timed()

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def sample_completions(plan: Plan, pol: Policy, examples):
    """G sampled completions per prompt from the current policy (a Rollout of N = P * G rows)."""
    r = plan.cfg.rollout
    return sample(
        pol.model,
        pol.tokenizer,
        pol.encoder(examples),
        group_size=r.group_size,
        max_new_tokens=plan.max_new_tokens,
        eos_ids=pol.eos_ids,
        do_sample=True,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        batch_size=r.batch_size,
        entropy=r.behaviour_logprobs == "sampler" and not r.log_mismatch,  # no trainer pass gives it then
    )


def behaviour_logprobs(plan: Plan, pol: Policy, rollout, keep):
    """(old_logp [N, C], entropy [N, C] or None, first_epoch or None, metrics) of a fresh rollout.

    rollout.behaviour_logprobs = trainer: the current weights' log-probs by a no-grad pass at the
    run's precision. With staleness 0 the first minibatch's rows get theirs from their own forward
    pass in the update instead (the policy has not moved yet: ``UpdateBatch.first_epoch``; their
    entropy rows stay zero until the update returns them).
    rollout.behaviour_logprobs = sampler: the sampling pass's own log-probs and entropy; with
    log_mismatch, one trainer pass measures |log pi_trainer - log pi_sampler| (mean, p99, max over
    sampled tokens). (``auto`` is resolved before a run starts: :func:`mhpo.trainer.defaults.behaviour_source`.)"""
    cfg = plan.cfg
    temperature, micro = cfg.rollout.temperature, cfg.update.micro_batch_size
    mask = rollout.completion_mask
    if cfg.rollout.behaviour_logprobs == "sampler":
        if not cfg.rollout.log_mismatch:
            return rollout.logprobs, rollout.entropy, None, {}
        trainer_logp, entropy = rollout_logprobs(
            pol.model, rollout, temperature=temperature, entropy=True, micro_batch_size=micro
        )
        gap = (trainer_logp - rollout.logprobs)[mask].abs()  # [tokens]
        stats = {}
        if gap.numel():
            stats = {
                "mismatch/abs_log_ratio_mean": float(gap.mean()),
                "mismatch/abs_log_ratio_p99": float(torch.quantile(gap.double(), 0.99)),
                "mismatch/abs_log_ratio_max": float(gap.max()),
            }
        return rollout.logprobs, entropy, None, stats
    kept = keep.nonzero().squeeze(-1)  # [n]
    groups = kept_groups(cfg, kept)
    first_epoch = minibatches(len(kept), cfg.update.num_minibatches, groups) if cfg.rollout.staleness == 0 else None
    in_first = torch.zeros(len(rollout), dtype=torch.bool)
    if first_epoch:
        in_first[kept[first_epoch[0]]] = True
    old_logp = torch.zeros(mask.shape, dtype=torch.float32)  # [N, C]
    entropy = torch.zeros_like(old_logp)
    rest = (~in_first).nonzero().squeeze(-1)
    if len(rest):
        part = rollout.select(rest, trim=False)
        old_logp[rest], entropy[rest] = rollout_logprobs(
            pol.model, part, temperature=temperature, entropy=True, micro_batch_size=micro
        )
    return old_logp, entropy, first_epoch, {}


def update_batch(plan: Plan, pol: Policy, sb: ScoredBatch, timer):
    """The UpdateBatch of a scored batch's kept rows, with the reference's log-probs when the
    objective needs them (frozen weights: the same whenever computed)."""
    cfg = plan.cfg
    kept = sb.keep.nonzero().squeeze(-1)  # [n]
    ref_logp = None
    if pol.reference is not None:
        with timer("logprobs"), pol.reference_scope():
            r, micro = cfg.rollout, cfg.update.micro_batch_size
            ref_logp, _ = rollout_logprobs(pol.reference, sb.rollout, temperature=r.temperature, micro_batch_size=micro)
    return UpdateBatch(
        sb.rollout.select(kept, trim=False),
        sb.old_logp[kept],
        sb.advantages[kept],
        temperature=cfg.rollout.temperature,
        norm_length=float(plan.max_new_tokens),
        ref_logp=ref_logp[kept] if ref_logp is not None else None,
        groups=kept_groups(cfg, kept),
        first_epoch=sb.first_epoch,
    )


def kept_groups(cfg: Config, kept: torch.Tensor) -> torch.Tensor | None:
    """[n] the group of each kept row (rows i*G .. i*G+G-1 are group i) when minibatches keep groups
    whole (update.minibatch_order = groups); None otherwise."""
    return kept // cfg.rollout.group_size if cfg.update.minibatch_order == "groups" else None


def step_metrics(plan, pol, sb: ScoredBatch, lr, update_stats, timer) -> dict[str, float]:
    """The step's metrics: the trained batch's rewards, lengths, entropy (when a trainer pass gave
    it), groups and sampling-time measures, the update's stats, timings."""
    rollout, scores, rewards, adv = sb.rollout, sb.scores, sb.rewards, sb.advantages
    mask = rollout.completion_mask
    lengths = mask.sum(-1).float()
    n_tok = float(mask.sum())
    G = plan.cfg.rollout.group_size
    metrics: dict[str, float] = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        **{f"reward/{name}": sum(v) / len(v) for name, v in scores.per_function.items()},
        "reward/errors": float(scores.errors),
        "reward/timeouts": float(scores.timeouts),
        "accuracy": sum(scores.correct) / len(scores.correct),
        "response_length/mean": float(lengths.mean()),
        "response_length/max": float(lengths.max()),
        "response/truncated_frac": float(1.0 - rollout.ended(pol.eos_ids).float().mean()),
        **({"entropy": float(sb.entropy.sum() / max(n_tok, 1.0))} if sb.entropy is not None else {}),
        "groups/zero_std_frac": float(zero_std_groups(rewards.view(-1, G)).float().mean()),
        "update/rows": float(sb.keep.sum()),
        "advantage/abs_mean": float(adv.abs().mean()),
        "lr": lr,
        **sb.metrics,
        **update_stats,
        "throughput/tokens_per_s": n_tok / max(timer.total, 1e-9),
        "time/step": timer.total,
        **{f"time/{phase}": seconds for phase, seconds in timer.seconds.items()},
    }
    if scores.messages:
        metrics["reward/first_error"] = scores.messages[0]  # type: ignore[assignment]
    return metrics
