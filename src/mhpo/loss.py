"""`policy_loss`: one call for every registered objective.

    loss = sum_{i,t} w_it * ( beta * k3_it - j_it )

with j the objective's per-token value (see :mod:`mhpo.objectives`), w the aggregation weights
(see :mod:`mhpo.aggregation`) and k3 the KL to a reference policy. The loss is to be minimised;
its gradient with respect to logp_it is w_it * (beta * dk3/dlogp - A_it * M(r_it)).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .aggregation import check_agg, token_weights
from .diagnostics import objective_stats
from .kl import k3
from .objectives import get_objective

_HALF = (torch.float16, torch.bfloat16)


def policy_loss(
    name: str,
    logp: torch.Tensor,  # [B, T] current policy log-probs of the sampled tokens (carries grad)
    old_logp: torch.Tensor,  # [B, T] behaviour policy log-probs
    advantages: torch.Tensor,  # [B] or [B, T]
    mask: torch.Tensor,  # [B, T] bool or {0, 1}
    *,
    agg: str = "token-mean",
    ref_logp: torch.Tensor | None = None,  # [B, T] frozen reference log-probs
    beta: float = 0.0,
    num_tokens: float | None = None,  # global masked-token count over the step (token-mean)
    num_seqs: float | None = None,  # global non-empty sequence count over the step (seq-mean-*)
    norm_length: float | None = None,  # constant L for seq-mean-token-sum-norm (default T)
    stats: bool = True,
    **hparams,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss (scalar, to minimise) and detached float diagnostics for objective ``name``.

    Half-precision inputs are computed in float32; the loss is float32 then. Global counts make
    k micro-batches (gradient accumulation, data parallel) sum to the full-batch gradient.
    Raises ValueError on an unknown objective, aggregation or hparam, a bad shape, or NaN/inf input.
    """
    objective = get_objective(name)
    hp = objective.resolve(hparams)
    check_agg(agg)
    _check_inputs(logp, old_logp, advantages, mask, ref_logp, beta)

    dtype = torch.float32 if logp.dtype in _HALF else logp.dtype
    m = mask.to(dtype)  # [B, T]
    keep = mask.bool()
    lp = logp.to(dtype)
    adv = advantages.to(dtype)
    adv = (adv.unsqueeze(-1) if adv.dim() == 1 else adv).expand_as(lp)  # [B, T]
    log_r = torch.where(keep, lp - old_logp.to(dtype), torch.zeros_like(lp))  # [B, T]

    terms = objective(lp, log_r, adv, m, **hp)
    per_token = -terms.value  # [B, T]
    kl = None
    if ref_logp is not None:
        kl = k3(lp, torch.where(keep, ref_logp.to(dtype), lp.detach()))
        if beta:
            per_token = per_token + beta * kl
    w = token_weights(m, agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length)
    loss = (torch.where(keep, per_token, torch.zeros_like(per_token)) * w).sum()

    out: dict[str, float] = {}
    if stats:
        ref_m = _on_policy_multiplier(name, tuple(sorted(hp.items())), dtype)  # (M(1) | A>0, A<=0)
        on_policy = torch.where(adv > 0, ref_m[0], ref_m[1])
        out = objective_stats(log_r, keep, terms.multiplier, on_policy, terms.extras, kl)
        out["loss"] = float(loss.detach())
    return loss, out


@lru_cache(maxsize=256)
def _on_policy_multiplier(name: str, hp_items: tuple, dtype: torch.dtype) -> tuple[float, float]:
    """M(r = 1) for A = +1 and A = -1: the reference for the generalised clip fraction."""
    z = torch.zeros(2, 1, dtype=dtype)
    adv = torch.tensor([[1.0], [-1.0]], dtype=dtype)
    terms = get_objective(name)(z, z, adv, torch.ones_like(z), **dict(hp_items))
    return float(terms.multiplier[0, 0]), float(terms.multiplier[1, 0])


def _check_inputs(logp, old_logp, advantages, mask, ref_logp, beta) -> None:
    tensors = {"logp": logp, "old_logp": old_logp, "advantages": advantages, "mask": mask}
    if ref_logp is not None:
        tensors["ref_logp"] = ref_logp
    for arg, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"policy_loss: {arg!r} must be a torch.Tensor, got {type(t).__name__}")
    if logp.dim() != 2:
        raise ValueError(f"policy_loss: 'logp' must have shape [B, T]; got {tuple(logp.shape)}")
    shape = tuple(logp.shape)
    for arg in ("old_logp", "mask", "ref_logp"):
        if arg in tensors and tuple(tensors[arg].shape) != shape:
            raise ValueError(f"policy_loss: {arg!r} has shape {tuple(tensors[arg].shape)}; expected {shape} like 'logp'")
    if tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(
            f"policy_loss: 'advantages' has shape {tuple(advantages.shape)}; expected {shape[:1]} or {shape}"
        )
    for arg in ("logp", "old_logp", "advantages", "ref_logp"):
        if arg in tensors and not tensors[arg].is_floating_point():
            raise ValueError(f"policy_loss: {arg!r} must be a floating-point tensor; got {tensors[arg].dtype}")
    devices = {str(t.device) for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError(f"policy_loss: all tensors must be on one device; got {sorted(devices)}")
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        raise ValueError("policy_loss: 'mask' must be bool or hold only 0 and 1")
    for arg in ("logp", "old_logp", "advantages", "ref_logp"):
        if arg in tensors:
            bad = ~torch.isfinite(tensors[arg])
            if bad.any():
                raise ValueError(
                    f"policy_loss: {arg!r} contains NaN or inf ({int(bad.sum())} of {bad.numel()} elements)"
                )
    if not isinstance(beta, (int, float)) or beta < 0 or beta != beta:
        raise ValueError(f"policy_loss: beta={beta!r} must be a number >= 0")
    if beta and ref_logp is None:
        raise ValueError(f"policy_loss: beta={beta} needs 'ref_logp' (the reference policy's log-probs)")
