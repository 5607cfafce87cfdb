"""SAPO: Soft Adaptive Policy Optimization (arXiv 2511.20347), a smooth sigmoid gate on r.

f(r) = sigmoid(tau (r - 1)) * 4 / tau,   tau = tau_pos if A > 0 else tau_neg
j = f(r) A,   dJ/dlogp = A * 4 sigma(x)(1 - sigma(x)) r,  x = tau (r - 1)   (M(1) = 1)
"""

from __future__ import annotations

import torch

from mhpo.objectives.registry import HParam, Tensor, Terms, objective, sat_exp


@objective(
    "sapo",
    formula="sigmoid(tau (r - 1)) 4/tau A,  tau = tau_pos if A > 0 else tau_neg",
    hparams={
        "tau_pos": HParam(1.0, ">0", "gate temperature for A > 0"),
        "tau_neg": HParam(1.05, ">0", "gate temperature for A <= 0"),
    },
)
def sapo(logp: Tensor, log_r: Tensor, adv: Tensor, mask: Tensor, *, tau_pos: float, tau_neg: float) -> Terms:
    """SAPO gate: j = sigmoid(tau (r-1)) 4/tau A;  M = 4 sigma (1 - sigma) r."""
    r = sat_exp(log_r)  # beyond e^80 the true slope r*sigma'(tau r) is 0 to double precision
    tau = torch.where(adv > 0, torch.full_like(r, tau_pos), torch.full_like(r, tau_neg))  # [B, T], r's dtype
    gate = torch.sigmoid(tau * (r - 1.0))
    value = gate * (4.0 / tau) * adv
    with torch.no_grad():
        g = gate.detach()
        mult = 4.0 * g * (1.0 - g) * r.detach()
    return Terms(value, mult)
