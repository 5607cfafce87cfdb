"""GSPO: Group Sequence Policy Optimization (arXiv 2507.18071), clipping a sequence-level ratio.

    s_i = exp( (1/|o_i|) sum_t log r_it )                          (geometric-mean ratio)
    gspo:        j_it = min(s_i A_it, clip(s_i, 1-eps_low, 1+eps_high) A_it)
    gspo-token:  s_it = sg(s_i) * exp(logp_it - sg logp_it)     (same value, per-token gradient)

With one advantage per sequence both have the same gradient in every aggregation mode:
dJ/dlogp_it = w_it A_i s_i (0 where clipped), since d s_i / d logp_it = s_i / |o_i| and each mode
weights a sequence's tokens uniformly. They differ only for per-token advantages.
"""

from __future__ import annotations

import torch

from mhpo.objectives.registry import HParam, Tensor, Terms, objective, sat_exp, seq_mean


def _clipped_seq_objective(s: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> Terms:
    """min(s A, clip(s) A) per token, with s [B, T] the (broadcast) sequence ratio."""
    clipped = ((adv > 0) & (s > 1 + eps_high)) | ((adv < 0) & (s < 1 - eps_low))  # [B, T]
    bound = s.detach().clamp(1 - eps_low, 1 + eps_high)
    value = torch.where(clipped, bound * adv, s * adv)
    mult = torch.where(clipped, torch.zeros_like(bound), s.detach())
    return Terms(value, mult, {"seq_ratio": s.detach()})


def _hparams():
    return {
        "eps_low": HParam(3e-4, "[0,1)", "lower clip on the sequence ratio: s >= 1 - eps_low"),
        "eps_high": HParam(4e-4, ">=0", "upper clip on the sequence ratio: s <= 1 + eps_high"),
    }


@objective("gspo", hparams=_hparams(), formula="min(s A, clip(s, 1-eps_low, 1+eps_high) A),  s = exp(mean_t log r)")
def gspo(logp: Tensor, log_r: Tensor, adv: Tensor, mask: Tensor, *, eps_low: float, eps_high: float) -> Terms:
    """GSPO: s_i = exp(mean_t log r_it);  j = min(s_i A, clip(s_i) A);  M = s_i unless clipped."""
    s = sat_exp(seq_mean(log_r, mask))  # [B]
    return _clipped_seq_objective(s.unsqueeze(-1).expand_as(log_r), adv, eps_low, eps_high)


@objective("gspo-token", hparams=_hparams(), formula="as gspo with s_t = sg(s) exp(logp - sg logp)")
def gspo_token(logp: Tensor, log_r: Tensor, adv: Tensor, mask: Tensor, *, eps_low: float, eps_high: float) -> Terms:
    """GSPO-token: s_it = sg(s_i) exp(log r_it - sg log r_it);  then as gspo per token."""
    log_s = seq_mean(log_r.detach(), mask).unsqueeze(-1)  # [B, 1], no gradient
    s = sat_exp(log_s + (log_r - log_r.detach()))  # [B, T], value s_i, d/dlogp_it = s_i
    return _clipped_seq_objective(s, adv, eps_low, eps_high)
