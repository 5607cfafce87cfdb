"""The policy update: log-probs of a rollout under a model, and minibatch optimizer steps.

Per RL step the rollout batch (N rows) is used ``epochs`` times; each epoch shuffles the rows and
splits them into ``num_minibatches`` minibatches, one optimizer step each (so from the second step
on, the ratio r = pi / pi_behaviour leaves 1 and the objective's ratio control matters). A minibatch
runs in micro-batches whose losses use the minibatch's global counts, so their gradients sum to the
full-minibatch gradient exactly:

    loss_mb = sum_micro policy_loss(..., num_tokens=N_tok(mb), num_seqs=N_seq(mb))
    g = clip(grad loss_mb, max_grad_norm);  AdamW step

The minibatch's distinct prompts run once (:class:`mhpo.models.logprobs.PromptPrefix`): their keys
and values serve every micro-batch, and the gradient the micro-batches leave on them goes back
through the prompt pass once, after the last micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mhpo.generation.rollout import Rollout, forward_inputs
from mhpo.models.logprobs import PromptPrefix, model_logprobs, prompt_prefix
from mhpo.models.multimodal import model_kwargs
from mhpo.objectives.aggregation import global_counts
from mhpo.objectives.diagnostics import log_ratio_order_stats, masked_log_ratio
from mhpo.objectives.loss import policy_loss


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
            lp, e = completion_logprobs(model, part, temperature, entropy)
            w = lp.shape[1]
            logp[rows, :w] = lp.float().cpu() * part.completion_mask
            if entropy:
                ent[rows, :w] = e.float().cpu() * part.completion_mask
    return logp, ent


def completion_logprobs(model, part: Rollout, temperature: float, entropy: bool, prompt_cache=None):
    """(log pi(y_t | x, y_<t) / T-tempered, entropy or None) of a rollout's completion tokens,
    [b, w] each (w: the rollout's completion width), on the model's device, with gradients if enabled.
    ``prompt_cache``: the rows' prompts already run (:meth:`PromptPrefix.cache`)."""
    ids, attn, extra = _model_inputs(model, part)
    return model_logprobs(
        model,
        ids,
        attn,
        part.prompt_width,
        temperature=temperature,
        entropy=entropy,
        share_prompts=True,
        prompt_cache=prompt_cache,
        **extra,
    )


def minibatch_prompts(model, rollout: Rollout) -> PromptPrefix | None:
    """The prompts of a minibatch's rows (``rollout``), run once for all its micro-batches; None where
    they cannot be shared (:func:`mhpo.models.logprobs.prompt_prefix`)."""
    ids, attn, extra = _model_inputs(model, rollout)
    return prompt_prefix(model, ids, attn, rollout.prompt_width, **extra)


def _model_inputs(model, part: Rollout):
    """(input_ids [b, L], attention_mask [b, L], extra keyword inputs) of ``part`` on the model's device."""
    device = next(model.parameters()).device
    ids, attn = part.input_ids.to(device), part.attention_mask.to(device)
    return ids, attn, model_kwargs(forward_inputs(part), ids, attn, device)


@dataclass
class UpdateBatch:
    """What the update needs from one RL step (rows already filtered)."""

    rollout: Rollout
    old_logp: torch.Tensor  # [N, C] behaviour log-probs (rows of first_epoch[0] are not read)
    advantages: torch.Tensor  # [N]
    temperature: float = 1.0  # the sampling temperature: log-probs are those of the tempered policy
    norm_length: float | None = None  # constant L of seq-mean-token-sum-norm (the completion budget)
    ref_logp: torch.Tensor | None = None  # [N, C] reference log-probs (KL)
    # [N] the group of each row, given when minibatches keep groups whole (update.minibatch_order = groups)
    groups: torch.Tensor | None = None
    # The first epoch's minibatches, drawn by the caller (:func:`minibatches`) before the update.
    # Given, the first minibatch's behaviour log-probs need no pass of their own: before the first
    # optimizer step the policy IS the behaviour policy, so that step's forward pass gives them
    # (returned in UpdateResult, with their entropy).
    first_epoch: list[torch.Tensor] | None = None


@dataclass
class UpdateResult:
    """The update's stats and, with ``first_epoch``, the first minibatch's behaviour log-probs."""

    stats: dict[str, float]
    first_rows: torch.Tensor | None = None  # [n1] rows of first_epoch[0]
    first_logp: torch.Tensor | None = None  # [n1, C] float32, zero off-mask
    first_entropy: torch.Tensor | None = None  # [n1, C] float32, zero off-mask


def minibatches(n: int, num_minibatches: int, groups: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One epoch's minibatches of rows range(n), drawn with the global generator.

    ``groups`` None: a random permutation of the rows in min(num_minibatches, n) near-equal parts.
    ``groups`` [n] (the group of each row; ``update.minibatch_order = groups``): a random permutation of
    the g distinct groups in min(num_minibatches, g) near-equal parts, each part's rows in row order, so
    that a group's rows share a minibatch.
    """
    if n == 0:
        return []
    if groups is None:
        return list(torch.tensor_split(torch.randperm(n), min(num_minibatches, n)))
    distinct, group_of_row = torch.unique(groups, return_inverse=True)  # [g], [n] in 0 .. g-1
    g = len(distinct)
    parts = torch.tensor_split(torch.randperm(g), min(num_minibatches, g))  # group ids per minibatch
    return [torch.isin(group_of_row, part).nonzero().squeeze(1) for part in parts]


# A forward + backward's fixed cost in completion positions (weight reads, per-call overheads): a
# micro-batch split pays off only when it saves more padding than this.
MICRO_OVERHEAD = 32


def micro_batches(
    rollout: Rollout,
    mb: torch.Tensor,
    max_rows: int | None,
    max_positions: int | None = None,
    prompts_shared: bool = False,
) -> list[torch.Tensor]:
    """A minibatch's rows ``mb`` [m] as micro-batches (positions in ``mb``), each padded only to its own
    longest completion: rows sorted by length, cut where it minimises the positions the forward runs,

        positions(micro-batch) = rows x longest completion + distinct prompts x prompt width
        cost(micro-batch) = positions + MICRO_OVERHEAD

    (the prompt term 0 with ``prompts_shared``: the minibatch's prompts ran once already;
    dynamic programming over the sorted rows; at most ``max_rows`` rows and ``max_positions``
    positions each, a single row longer than that alone). The gradient is the same sum whatever the
    split (global token counts), up to float rounding. Completions of 5 to 64 tokens in one minibatch
    otherwise pad every row to 64. With ``max_positions``, rows of equal length are ordered by prompt,
    so a cut between them runs as few prompts twice as it can; without it the order within a length
    is the minibatch's (as before that bound existed: same splits, same float sums)."""
    m = len(mb)
    cap = min(max_rows or m, m)
    lengths = rollout.completion_mask[mb].sum(-1)  # [m]
    P = rollout.prompt_width
    prompt_cost = 0 if prompts_shared else P  # positions a distinct prompt adds to a micro-batch
    prompt_of = torch.unique(rollout.input_ids[mb, :P], dim=0, return_inverse=True)[1]  # [m] prompt id
    key = lengths * m + prompt_of if max_positions is not None else lengths  # [m] sort key
    order = torch.sort(key, stable=True).indices  # [m] positions, shortest first
    prompt = prompt_of.tolist()
    longest, ranked = lengths[order].tolist(), order.tolist()  # plain lists for the loop below
    budget = max_positions or float("inf")
    best = [0.0] + [float("inf")] * m  # best[j]: cheapest split of the j shortest rows
    cut = [0] * (m + 1)
    for j in range(1, m + 1):
        seen: set[int] = set()
        for i in range(j - 1, max(j - cap, 0) - 1, -1):  # the micro-batch is sorted rows i .. j-1
            seen.add(prompt[ranked[i]])
            positions = (j - i) * longest[j - 1] + len(seen) * prompt_cost
            if positions > budget and i < j - 1:
                break  # adding rows only adds positions
            cost = best[i] + positions + MICRO_OVERHEAD
            if cost < best[j]:
                best[j], cut[j] = cost, i
    parts, j = [], m
    while j > 0:
        parts.append(order[cut[j] : j])
        j = cut[j]
    return parts[::-1]


def policy_update(model, optimizer, batch: UpdateBatch, objective_cfg, update_cfg) -> UpdateResult:
    """Run the optimizer steps of one RL step; returns averaged objective stats and grad norms.

    ``objective_cfg`` has name, hparams, agg and beta (:class:`mhpo.trainer.config.ObjectiveConfig`);
    ``update_cfg`` has num_minibatches, epochs, micro_batch_size, micro_batch_tokens, max_grad_norm and
    minibatch_order (:class:`mhpo.trainer.config.UpdateConfig`). Minibatch order comes from
    ``torch.randperm`` on the global generator (saved in checkpoints); ``batch.first_epoch`` gives the
    first epoch's when the caller drew them already; ``batch.groups`` keeps groups whole
    (``update_cfg.minibatch_order = groups``).
    """
    n = len(batch.rollout)
    if update_cfg.minibatch_order == "groups" and batch.groups is None:
        raise ValueError("update.minibatch_order=groups needs UpdateBatch.groups (the group of each row)")
    if n == 0:
        return UpdateResult({"update/optimizer_steps": 0.0})
    params = [p for p in model.parameters() if p.requires_grad]
    from_first_step = batch.first_epoch is not None and len(batch.first_epoch) > 0
    old_logp = batch.old_logp.clone() if from_first_step else batch.old_logp  # [N, C]; the caller's stays as given
    first_entropy = torch.zeros_like(old_logp[batch.first_epoch[0]]) if from_first_step else None
    per_step: list[dict[str, float]] = []
    norms: list[float] = []
    model.train()
    for epoch in range(update_cfg.epochs):
        first = epoch == 0 and from_first_step
        splits = batch.first_epoch if first else minibatches(n, update_cfg.num_minibatches, batch.groups)
        for i, mb in enumerate(splits):
            fill = first and i == 0
            stats, norm = _optimizer_step(
                model,
                optimizer,
                params,
                batch,
                old_logp,
                mb,
                objective_cfg,
                update_cfg,
                first_entropy if fill else None,
            )
            if stats is not None:
                per_step.append(stats)
                norms.append(norm)
    optimizer.zero_grad(set_to_none=True)
    out = {f"policy/{k}": v for k, v in mean_stats(per_step).items()}
    if norms:
        out["grad_norm"] = sum(norms) / len(norms)
        out["grad_norm/max"] = max(norms)
    out["update/optimizer_steps"] = float(len(norms))
    if not from_first_step:
        return UpdateResult(out)
    rows = batch.first_epoch[0]
    return UpdateResult(out, rows, old_logp[rows], first_entropy)


def _optimizer_step(model, optimizer, params, batch, old_logp, mb, objective_cfg, update_cfg, fill_entropy):
    """One minibatch ``mb`` [m] of rows: micro-batched forward / backward, clip, step.

    With ``fill_entropy`` ([m, C], the first step's) the behaviour log-probs of these rows are this
    very forward pass: written into ``old_logp`` (the update's own copy) and their entropy into
    ``fill_entropy``. Returns (stats, grad norm), or (None, 0) for a minibatch without tokens."""
    device = params[0].device
    counts = global_counts(batch.rollout.completion_mask[mb])
    if counts["num_tokens"] == 0:
        return None, 0.0
    optimizer.zero_grad(set_to_none=True)
    micro_stats, micro_lr = [], []
    u = update_cfg
    whole = batch.rollout.select(mb)
    # Unless micro-batches are bounded in positions (each then counts and runs its own prompts), the
    # minibatch's prompts run once: forward here, backward after the last micro-batch.
    prompts = minibatch_prompts(model, whole) if u.micro_batch_tokens is None else None
    micros = micro_batches(batch.rollout, mb, u.micro_batch_size, u.micro_batch_tokens, prompts is not None)
    for pos in micros:  # positions in mb
        rows = mb[pos]
        part = whole.select(pos, trim_prompt=prompts is None)  # with prompts: their columns as they ran
        cache = prompts.cache(pos) if prompts is not None else None
        w = part.completion_mask.shape[1]
        logp, ent = completion_logprobs(model, part, batch.temperature, fill_entropy is not None, cache)  # [b, w]
        mask = part.completion_mask.to(device)
        if fill_entropy is not None:  # the behaviour log-probs of these rows are this very forward pass
            old_logp[rows, :w] = logp.detach().float().cpu() * part.completion_mask
            fill_entropy[pos, :w] = ent.detach().float().cpu() * part.completion_mask
        old = old_logp[rows, :w].to(device=device, dtype=logp.dtype)
        ref = batch.ref_logp[rows, :w].to(device=device, dtype=logp.dtype) if batch.ref_logp is not None else None
        if len(micros) > 1:  # the step's percentiles are taken over all its micro-batches' tokens
            micro_lr.append(masked_log_ratio(logp, old, mask).cpu())
        loss, stats = policy_loss(
            objective_cfg.name,
            logp,
            old,
            batch.advantages[rows].to(device=device, dtype=logp.dtype),
            mask,
            agg=objective_cfg.agg,
            ref_logp=ref,
            beta=objective_cfg.beta,
            num_tokens=counts["num_tokens"],
            num_seqs=counts["num_seqs"],
            norm_length=batch.norm_length,
            **objective_cfg.hparams,
        )
        loss.backward()
        micro_stats.append(stats)
    if prompts is not None:
        prompts.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, update_cfg.max_grad_norm)
    optimizer.step()
    return combine_micro(micro_stats, torch.cat(micro_lr) if micro_lr else None), float(norm)


_MAX_KEYS = ("ratio/max", "ratio/p99")
_MIN_KEYS = ("ratio/min", "ratio/p1")
_SUM_KEYS = ("loss", "tokens")


def combine_micro(stats: list[dict[str, float]], log_ratios: torch.Tensor | None = None) -> dict[str, float]:
    """One optimizer step's stats from its micro-batches: loss and tokens summed, the rest
    token-weighted means. When ``log_ratios`` (the step's masked log r, concatenated) is given, the
    ratio's min / max are recomputed over all of them and p1 / p99 and |log r| p99 re-estimated
    from a sample of them (every d-th, at most SAMPLE; exact up to SAMPLE tokens; see
    mhpo.objectives.diagnostics); without it, min / max are exact and p1 / p99 are the extreme
    micro-batch's (a bound, not the step's percentile)."""
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
    as the maximum over the optimizer steps (the most extreme step's percentile: each step
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
