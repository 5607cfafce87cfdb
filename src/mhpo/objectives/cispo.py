"""CISPO: clipped importance-sampling weight policy optimisation (MiniMax-M1, arXiv 2506.13585).

    j = sg(clip(r, floor, cap)) * A * logp,   dJ/dlogp = A * clip(r, floor, cap)

Every token keeps a gradient; only the (stop-gradient) weight is clipped. ``cap`` is an absolute
bound on r as in TRL (5.0); verl's `clip_ratio_high = 0.2` means cap = 1.2 and it also applies a
floor 1 - clip_ratio_low (0.8); set ``floor`` to reproduce it. The default has no floor.
"""

from __future__ import annotations

import math

from mhpo.objectives.registry import HParam, Tensor, Terms, objective


@objective(
    "cispo",
    formula="sg(clip(r, floor, cap)) A logp",
    hparams={
        "cap": HParam(5.0, ">0", "absolute upper bound on the IS weight (TRL: 5.0; verl: 1.2)"),
        "floor": HParam(0.0, ">=0", "lower bound on the IS weight (verl: 0.8); 0 = none"),
    },
)
def cispo(logp: Tensor, log_r: Tensor, adv: Tensor, mask: Tensor, *, cap: float, floor: float) -> Terms:
    """CISPO: j = sg(clip(r, floor, cap)) A logp;  M = clip(r, floor, cap)."""
    if floor >= cap:
        raise ValueError(f"objective 'cispo': hparam floor={floor} must be below cap={cap}")
    # exp of the log-ratio capped at log(cap): never overflows, no gradient through the weight
    w = log_r.detach().clamp(max=math.log(cap)).exp().clamp(min=floor)  # [B, T]
    return Terms(w * adv * logp, w)
