"""KL penalty to a frozen reference policy: the DeepSeekMath k3 estimator.

k3 = exp(ref - logp) - (ref - logp) - 1   >= 0,   d k3 / d logp = 1 - exp(ref - logp)
"""

from __future__ import annotations

import torch

from mhpo.objectives.registry import sat_exp


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T]
    """Per-token k3 KL estimate of KL(pi || ref); the exponential saturates instead of overflowing."""
    d = ref_logp - logp
    return sat_exp(d) - d - 1.0
