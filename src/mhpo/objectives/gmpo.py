"""GMPO: Geometric-Mean Policy Optimization (arXiv 2507.20673).

Token log-ratios are clipped PPO-style in log space, by the sign of the sequence advantage, and
combined by a geometric mean:

    l_it  = min(log r_it, eps_high)  if A_i >= 0,   max(log r_it, -eps_low)  if A_i < 0
    rho_i = exp( (1/|o_i|) sum_t l_it )
    J_i   = A_i rho_i,       dJ_i/dlogp_it = A_i rho_i / |o_i|  (0 for clipped tokens)

A_i is the masked mean of the advantages over the sequence (as verl's geo_mean does). Unlike
verl, which always averages over sequences, the aggregation mode is honoured (J_i is spread over
the sequence's tokens; seq-mean-token-mean gives GMPO's own (1/G) sum_i J_i).
"""

from __future__ import annotations

import torch

from mhpo.objectives.registry import HParam, Tensor, Terms, objective, sat_exp, seq_mean


@objective(
    "gmpo",
    formula="A exp(mean_t clip(log r, -eps_low, eps_high)) per sequence (clip by sign of A)",
    hparams={
        "eps_low": HParam(0.4, ">0", "lower clip on log r (A < 0): log r >= -eps_low"),
        "eps_high": HParam(0.4, ">0", "upper clip on log r (A >= 0): log r <= eps_high"),
    },
)
def gmpo(logp: Tensor, log_r: Tensor, adv: Tensor, mask: Tensor, *, eps_low: float, eps_high: float) -> Terms:
    """GMPO: rho_i = exp(mean_t clip(log r_it)) (by sign of A_i);  j = A_i rho_i;  M = rho_i unless clipped."""
    a_seq = seq_mean(adv, mask).unsqueeze(-1)  # [B, 1]
    pos = a_seq >= 0
    clipped_log_r = torch.where(pos, log_r.clamp(max=eps_high), log_r.clamp(min=-eps_low))  # [B, T]
    clipped = torch.where(pos, log_r > eps_high, log_r < -eps_low)  # [B, T] bool
    rho = sat_exp(seq_mean(clipped_log_r, mask)).unsqueeze(-1)  # [B, 1]
    value = (rho * a_seq).expand_as(log_r)
    mult = torch.where(clipped, torch.zeros_like(log_r), rho.detach().expand_as(log_r))
    return Terms(value, mult, {"seq_ratio": rho.detach().expand_as(log_r)})
