"""PPO-clip as GRPO uses it, and DAPO's clip-higher variant.

    j = min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)

The min selects the clipped branch (no gradient) exactly when A > 0 and r > 1 + eps_high, or
A < 0 and r < 1 - eps_low; otherwise j = r A. Written with that mask rather than torch.min so that
the gradient is unambiguous at ties. Optional dual-clip (verl's `clip_ratio_c`, off by default):
for A < 0 and r > dual_clip, j = dual_clip * A (no gradient).
"""

from __future__ import annotations

import torch

from mhpo.objectives.registry import HParam, Tensor, Terms, objective, sat_exp


def _hparams(eps_low: float, eps_high: float):
    return {
        "eps_low": HParam(eps_low, "[0,1)", "lower clip: r >= 1 - eps_low"),
        "eps_high": HParam(eps_high, ">=0", "upper clip: r <= 1 + eps_high"),
        "dual_clip": HParam(None, ">1", "dual-clip bound for A < 0 (verl clip_ratio_c); off"),
    }


@objective(
    "dapo",
    hparams=_hparams(0.2, 0.28),
    formula="min(r A, clip(r, 1-eps_low, 1+eps_high) A), clip-higher; use agg token-mean",
)
@objective("grpo", hparams=_hparams(0.2, 0.2), formula="min(r A, clip(r, 1-eps, 1+eps) A)")
def ppo_clip(
    logp: Tensor,
    log_r: Tensor,  # [B, T]
    adv: Tensor,  # [B, T]
    mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
) -> Terms:
    """PPO clip: j = min(r A, clip(r, 1-eps_low, 1+eps_high) A);  M = r unless clipped, else 0."""
    r = sat_exp(log_r)
    clipped = ((adv > 0) & (r > 1 + eps_high)) | ((adv < 0) & (r < 1 - eps_low))  # [B, T] bool
    bound = r.detach().clamp(1 - eps_low, 1 + eps_high)
    if dual_clip is not None:
        dual = (adv < 0) & (r > dual_clip)
        clipped = clipped | dual
        bound = torch.where(dual, torch.full_like(bound, dual_clip), bound)
    value = torch.where(clipped, bound * adv, r * adv)
    mult = torch.where(clipped, torch.zeros_like(bound), r.detach())
    return Terms(value, mult)
