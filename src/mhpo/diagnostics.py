"""Detached diagnostics of one objective evaluation, over masked-in tokens only.

    ratio/{mean,min,max,p1,p99}   r = exp(log r)  (percentiles: nearest rank)
    log_ratio/abs_mean, abs_p99   mean and 99th percentile of |log r|
    clip_frac                     fraction of tokens with M(r) < 0.1 * M(1): gradient zeroed or
                                  damped below 10% of its on-policy value (generalised clip fraction)
    multiplier/mean               mean M(r) = (dJ/dlogp) / A
    mhpo/{psi,zeta,survival}_mean for the MHPO family (survival = exp(-zeta))
    kl                            mean k3 to the reference, when one is given
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

DAMPED = 0.1  # a token counts as clipped when its multiplier is below this share of M(1)


def masked_quantiles(x: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    """Nearest-rank quantiles of a 1-D tensor via kthvalue (O(n), no 16M-element limit)."""
    n = x.numel()
    if n == 0:
        return [0.0 for _ in qs]
    return [float(x.kthvalue(1 + round(q * (n - 1))).values) for q in qs]


def _exp(v: float) -> float:
    return math.exp(min(v, 700.0))


@torch.no_grad()
def objective_stats(
    log_r: torch.Tensor,  # [B, T]
    mask: torch.Tensor,  # [B, T] bool
    multiplier: torch.Tensor,  # [B, T]
    on_policy_multiplier: torch.Tensor,  # [B, T] M(1) for each token's advantage sign
    extras: Mapping[str, torch.Tensor],
    kl: torch.Tensor | None = None,  # [B, T]
) -> dict[str, float]:
    n = int(mask.sum())
    stats: dict[str, float] = {"tokens": float(n)}
    if n == 0:
        keys = ["ratio/mean", "ratio/min", "ratio/max", "ratio/p1", "ratio/p99", "log_ratio/abs_mean", "log_ratio/abs_p99"]
        keys += ["clip_frac", "multiplier/mean"] + [f"mhpo/{k}_mean" for k in extras if k in _MHPO]
        stats.update({k: 0.0 for k in keys})
        if kl is not None:
            stats["kl"] = 0.0
        return stats
    lr = log_r[mask].double()  # [n]
    p1, p99 = masked_quantiles(lr, (0.01, 0.99))
    stats["ratio/mean"] = float(lr.clamp(max=700.0).exp().mean())
    stats["ratio/min"] = _exp(float(lr.min()))
    stats["ratio/max"] = _exp(float(lr.max()))
    stats["ratio/p1"] = _exp(p1)
    stats["ratio/p99"] = _exp(p99)
    abs_lr = lr.abs()
    stats["log_ratio/abs_mean"] = float(abs_lr.mean())
    stats["log_ratio/abs_p99"] = masked_quantiles(abs_lr, (0.99,))[0]
    m = multiplier[mask]
    stats["clip_frac"] = float((m < DAMPED * on_policy_multiplier[mask]).double().mean())
    stats["multiplier/mean"] = float(m.double().mean())
    for key in _MHPO:
        if key in extras:
            stats[f"mhpo/{key}_mean"] = float(extras[key][mask].double().mean())
    if kl is not None:
        stats["kl"] = float(kl[mask].double().mean())
    return stats


_MHPO = ("psi", "zeta", "survival")
