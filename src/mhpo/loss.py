"""`policy_loss`: one call for every registered objective.

    loss = sum_{i,t} w_it * ( beta * k3_it - j_it )

with j the objective's per-token value (see :mod:`mhpo.objectives`), w the aggregation weights
(see :mod:`mhpo.aggregation`) and k3 the KL to a reference policy. The loss is to be minimised;
its gradient with respect to logp_it is w_it * (beta * dk3/dlogp - A_it * M(r_it)).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .aggregation import check_agg, row_weights
from .diagnostics import objective_stats
from .kl import k3
from .objectives import Terms, get_objective

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
    impl: str = "auto",  # "auto": fused kernel where one applies; "compile": that kernel via torch.compile; "reference": autograd
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

    if impl not in IMPLS:
        raise ValueError(f"policy_loss: unknown impl {impl!r}; valid: {', '.join(IMPLS)}")

    dtype = torch.float32 if logp.dtype in _HALF else logp.dtype
    keep = mask.bool()  # [B, T]
    m = keep.to(dtype)
    lp = logp.to(dtype)
    old = old_logp.to(dtype)
    adv = advantages.to(dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv  # [B, 1] or [B, T]
    row = row_weights(m, agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length)  # [B, 1]

    fast = None
    if impl != "reference":
        fast = objective.fast(lp, old, m * (adv * row), stats, compiled=impl == "compile", **hp)
    if fast is not None:  # loss = -sum w A exp(psi - sg zeta), analytic backward
        loss, parts = fast
        if stats:
            with torch.no_grad():
                log_r = torch.where(keep, lp - old, 0.0)
                terms = Terms(log_r, parts[2], {"psi": parts[0], "zeta": parts[1], "survival": torch.exp(-parts[1])})
    else:
        log_r = torch.where(keep, lp - old, torch.zeros_like(lp))  # [B, T]
        terms = objective(lp, log_r, adv.expand_as(lp), m, **hp)
        loss = -(terms.value * (m * row)).sum()
    kl = None
    if ref_logp is not None:
        kl = k3(lp, torch.where(keep, ref_logp.to(dtype), lp.detach()))  # [B, T]
        if beta:
            loss = loss + beta * (kl * (m * row)).sum()

    out: dict[str, float] = {}
    if stats:
        ref_m = _on_policy_multiplier(name, tuple(sorted(hp.items())), dtype)  # (M(1) | A>0, A<=0)
        on_policy = torch.where(adv.expand_as(lp) > 0, ref_m[0], ref_m[1])
        out = objective_stats(log_r, keep, terms.multiplier, on_policy, terms.extras, kl)
        out["loss"] = float(loss.detach())
    return loss, out


IMPLS = ("auto", "compile", "reference")


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
            _check_finite(arg, tensors[arg])
    if not isinstance(beta, (int, float)) or beta < 0 or beta != beta:
        raise ValueError(f"policy_loss: beta={beta!r} must be a number >= 0")
    if beta and ref_logp is None:
        raise ValueError(f"policy_loss: beta={beta} needs 'ref_logp' (the reference policy's log-probs)")


def _check_finite(arg: str, t: torch.Tensor) -> None:
    """ValueError if t holds NaN or inf. One reduction: a NaN or inf anywhere makes the sum
    non-finite; only then (or if finite values overflowed the sum) is each element checked."""
    if torch.isfinite(t.detach().sum(dtype=torch.float64)):
        return
    bad = ~torch.isfinite(t)
    if bad.any():
        raise ValueError(f"policy_loss: {arg!r} contains NaN or inf ({int(bad.sum())} of {bad.numel()} elements)")
