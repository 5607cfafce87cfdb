"""REINFORCE with a plain importance weight: the unclipped baseline, for sanity checks.

    j = r * A,   dJ/dlogp = A * r   (M(r) = r)

MHPO with LFM and DHP both off reduces to exactly this.
"""

from __future__ import annotations

from mhpo.objectives.registry import Tensor, Terms, objective, sat_exp


@objective("reinforce", formula="r A")
def reinforce(logp: Tensor, log_r: Tensor, adv: Tensor, mask: Tensor) -> Terms:
    """Importance-weighted REINFORCE: j = r A,  M(r) = r  (r = exp(log r), saturating at e^80)."""
    r = sat_exp(log_r)  # [B, T]
    return Terms(r * adv, r.detach())
