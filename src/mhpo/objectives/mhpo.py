"""MHPO: Modulated Hazard-aware Policy Optimization (arXiv 2603.16929).

    psi(r)  = c * tanh(log r / c)                                   Log-Fidelity Modulator (LFM)
    zeta(r) = (softplus(sg psi) / lambda_pos)^k_pos
            + (softplus(-sg psi) / lambda_neg)^k_neg                Decoupled Hazard Penalty (DHP)
    J       = E[ exp(psi - sg zeta) * A ]
    dJ/dlogp = A * exp(psi - zeta) * sech^2(log r / c)  =: A * M(r)

With the paper defaults the on-policy weight is exp(-zeta(1)) = 0.265, not 1: softplus(0) = ln 2,
so zeta(1) = (ln2/1)^1.5 + (ln2/0.8)^2 = 1.328. That is the formula as written and the default here.
"""

from __future__ import annotations

import torch

from mhpo.objectives.mhpo_formula import dhp, lfm, on_policy_weight
from mhpo.objectives.mhpo_fused import mhpo_fused_loss
from mhpo.objectives.registry import MAX_LOG_RATIO, HParam, Tensor, Terms, objective, sat_exp


def mhpo_terms(
    logp: Tensor,
    log_r: Tensor,  # [B, T]
    adv: Tensor,  # [B, T]
    mask: Tensor,  # [B, T]
    *,
    c: float,
    k_pos: float,
    lambda_pos: float,
    k_neg: float,
    lambda_neg: float,
    lfm_on: bool = True,
    dhp_on: bool = True,
    rescale: bool = False,
) -> Terms:
    """MHPO per token: j = exp(psi - sg zeta) * A,  M = exp(psi - zeta) * sech^2(log r / c).

    psi = c*tanh(log r / c) (LFM; raw log r when LFM is off), zeta = DHP(psi) (0 when DHP is off).
    ``rescale`` divides by the on-policy weight exp(-zeta(1)) so that M(1) = 1 (mhpo-rescaled only).
    """
    psi = lfm(log_r, c) if lfm_on else log_r
    zeta = dhp(psi, k_pos, lambda_pos, k_neg, lambda_neg) if dhp_on else torch.zeros_like(psi)
    scale = 1.0
    if rescale and dhp_on:
        scale = 1.0 / on_policy_weight(k_pos, lambda_pos, k_neg, lambda_neg)
    # exp(psi - sg zeta); psi <= c is bounded with LFM, else saturate like `reinforce` does.
    bounded = lfm_on and c <= MAX_LOG_RATIO
    weight = torch.exp(psi - zeta) if bounded else sat_exp(psi - zeta)
    if scale != 1.0:
        weight = weight * scale
    value = weight * adv
    with torch.no_grad():
        mult = weight.detach()
        if lfm_on:
            t = psi.detach() / c  # tanh(log r / c)
            mult = mult * (1.0 - t * t)  # sech^2(log r / c) = 1 - tanh^2
        survival = torch.exp(-zeta)
    return Terms(value, mult, {"psi": psi.detach(), "zeta": zeta, "survival": survival})


def _mhpo_hparams(c=1.5, k_pos=1.5, lambda_pos=1.0, k_neg=2.0, lambda_neg=0.8, switches=True):
    hp = {
        "c": HParam(c, ">0", "LFM bound: psi in (-c, c)"),
        "k_pos": HParam(k_pos, ">0", "Weibull shape, upward shift (r > 1)"),
        "lambda_pos": HParam(lambda_pos, ">0", "Weibull scale, upward shift"),
        "k_neg": HParam(k_neg, ">0", "Weibull shape, downward shift (r < 1)"),
        "lambda_neg": HParam(lambda_neg, ">0", "Weibull scale, downward shift"),
    }
    if switches:
        hp["lfm"] = HParam(True, "bool", "Log-Fidelity Modulator on (off: raw log r)")
        hp["dhp"] = HParam(True, "bool", "Decoupled Hazard Penalty on (off: zeta = 0)")
    return hp


def _mhpo_fast(
    logp, old_logp, coef, *, diagnostics, compiled=False, per_token=False, lfm=True, dhp=True, rescale=False, **hp
):
    """The fused path (see mhpo_fused) for LFM and DHP both on; None otherwise."""
    if not (lfm and dhp) or hp["c"] > MAX_LOG_RATIO:
        return None
    scale = 1.0 / on_policy_weight(hp["k_pos"], hp["lambda_pos"], hp["k_neg"], hp["lambda_neg"]) if rescale else 1.0
    coef = coef * scale if rescale else coef
    if rescale and not isinstance(diagnostics, bool):  # a diagnostics sink: M is reported times the scale
        diagnostics.m_scale = scale
    loss, parts = mhpo_fused_loss(
        logp, old_logp, coef, diagnostics=diagnostics, compiled=compiled, per_token=per_token, **hp
    )
    if parts is not None and rescale:
        parts = (parts[0], parts[1], parts[2] * scale)
    return loss, parts


_FORMULA = "exp(psi - sg zeta) A;  psi = c tanh(log r / c),  zeta = (s(psi)/lp)^kp + (s(-psi)/ln)^kn"


# The paper's objective and its ablations: one function, other defaults or switches. The decorator
# nearest the function registers first (mhpo, then its ablations, in the order listed upward).
@objective(
    "mhpo-rescaled",
    hparams=_mhpo_hparams(switches=False),
    fixed={"rescale": True},
    fused=_mhpo_fast,
    formula="exp(psi - sg zeta) A / exp(-zeta(1))  (NOT the paper: on-policy weight 1 instead of 0.265)",
)
@objective(
    "mhpo-symmetric",
    hparams=_mhpo_hparams(k_neg=1.5, lambda_neg=1.0),
    fused=_mhpo_fast,
    formula="mhpo with k_neg = k_pos, lambda_neg = lambda_pos  (ablation: symmetric DHP)",
)
@objective(
    "mhpo-dhp-only",
    hparams={**_mhpo_hparams(), "lfm": HParam(False, "bool", "Log-Fidelity Modulator on")},
    fused=_mhpo_fast,
    formula="exp(log r - sg zeta) A  (ablation: LFM off, psi = log r)",
)
@objective(
    "mhpo-lfm-only",
    hparams={**_mhpo_hparams(), "dhp": HParam(False, "bool", "Decoupled Hazard Penalty on")},
    fused=_mhpo_fast,
    formula="exp(psi) A  (ablation: DHP off, zeta = 0)",
)
@objective("mhpo", hparams=_mhpo_hparams(), fused=_mhpo_fast, formula=_FORMULA)
def _mhpo(logp, log_r, adv, mask, *, lfm=True, dhp=True, **hp) -> Terms:
    return mhpo_terms(logp, log_r, adv, mask, lfm_on=lfm, dhp_on=dhp, **hp)


_mhpo.__doc__ = mhpo_terms.__doc__
