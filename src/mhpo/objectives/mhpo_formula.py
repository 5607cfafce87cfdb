"""MHPO's formula as pure functions, shared by the reference objective, the compiled kernel and
the tests (the chunked CPU kernel in :mod:`mhpo.objectives.mhpo_fused` is the same arithmetic
done in place, and is tested equal to these).

    psi  = c * tanh(log r / c)                                         lfm
    zeta = (s(psi) / lambda_pos)^k_pos + (s(-psi) / lambda_neg)^k_neg   dhp,  s = softplus
    M    = exp(psi - zeta) * (1 - tanh^2(log r / c))                    the gradient multiplier
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def power(s: Tensor, k: float) -> Tensor:
    """s^k with the common shapes spelled out (pow costs an exp and a log per token); a new tensor."""
    if k == 1.0:
        return s.clone()
    if k == 2.0:
        return s * s
    if k == 1.5:
        return s.sqrt().mul_(s)
    if k == 0.5:
        return s.sqrt()
    return s.pow(k)


def hazard(s: Tensor, k: float, lam: float) -> Tensor:
    """Weibull cumulative hazard H(s) = (s / lam)^k = lam^-k * s^k, for s >= 0."""
    return power(s, k).mul_(lam ** (-k))


def lfm(log_r: Tensor, c: float) -> Tensor:
    """Log-Fidelity Modulator psi = c * tanh(log r / c): ~log r near r = 1, bounded in (-c, c)."""
    return c * torch.tanh(log_r / c)


def dhp(psi: Tensor, k_pos: float, lambda_pos: float, k_neg: float, lambda_neg: float) -> Tensor:
    """Decoupled Hazard Penalty zeta = H_pos(softplus(psi)) + H_neg(softplus(-psi)); no gradient.

    softplus(-x) = softplus(x) - x, so one softplus serves both directions.
    """
    psi = psi.detach()
    sp = F.softplus(psi)  # s(psi)
    return hazard(sp, k_pos, lambda_pos) + hazard(sp - psi, k_neg, lambda_neg)


def on_policy_weight(k_pos: float, lambda_pos: float, k_neg: float, lambda_neg: float) -> float:
    """exp(-zeta(r = 1)) = exp(-(ln2/lambda_pos)^k_pos - (ln2/lambda_neg)^k_neg); 0.265 at defaults."""
    ln2 = math.log(2.0)
    return math.exp(-((ln2 / lambda_pos) ** k_pos) - (ln2 / lambda_neg) ** k_neg)
