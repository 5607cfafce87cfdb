"""Independent float64 reference for the objectives, written from ../shared/reference/OBJECTIVES.md.

Nothing here imports mhpo: these are the sheet's formulas, used to check the library's autograd
gradients and loss values. All tensors are float64 without autograd.

For each objective: `value` gives the per-token objective j [B, T] and `grad_J` the exact gradient
of J = sum_t w_t j_t with respect to logp [B, T], for aggregation weights w that are uniform inside
each sequence (as every aggregation mode is).
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def softplus(x):
    return torch.nn.functional.softplus(x)


def seq_len(mask):
    return mask.sum(-1).clamp(min=1)  # [B]


def mhpo_parts(lr, c=1.5, k_pos=1.5, lambda_pos=1.0, k_neg=2.0, lambda_neg=0.8, lfm=True, dhp=True):
    """psi, zeta and M = exp(psi - zeta) sech^2(lr / c) (M = exp(lr - zeta) without LFM)."""
    psi = c * torch.tanh(lr / c) if lfm else lr
    if dhp:
        zeta = (softplus(psi) / lambda_pos) ** k_pos + (softplus(-psi) / lambda_neg) ** k_neg
    else:
        zeta = torch.zeros_like(psi)
    w = torch.exp(psi - zeta)
    sech2 = 1.0 / torch.cosh(lr / c) ** 2 if lfm else torch.ones_like(lr)
    return psi, zeta, w, w * sech2


def token_level(name, lr, adv, hp):
    """(j, M) for token-level objectives; adv [B, T]."""
    r = torch.exp(lr)
    if name == "reinforce":
        return r * adv, r
    if name in ("grpo", "dapo"):
        el, eh = hp["eps_low"], hp["eps_high"]
        clipped = ((adv > 0) & (r > 1 + eh)) | ((adv < 0) & (r < 1 - el))
        if hp.get("dual_clip") is not None:
            clipped = clipped | ((adv < 0) & (r > hp["dual_clip"]))
        j = torch.minimum(r * adv, r.clamp(1 - el, 1 + eh) * adv)
        if hp.get("dual_clip") is not None:
            j = torch.where(adv < 0, torch.maximum(j, hp["dual_clip"] * adv), j)
        return j, torch.where(clipped, 0.0, r)
    if name == "sapo":
        tau = torch.where(adv > 0, torch.full_like(r, hp["tau_pos"]), torch.full_like(r, hp["tau_neg"]))
        s = torch.sigmoid(tau * (r - 1))
        return s * 4 / tau * adv, 4 * s * (1 - s) * r
    if name == "cispo":
        return None, r.clamp(hp["floor"], hp["cap"])  # value depends on logp: see value()
    if name.startswith("mhpo"):
        kw = {k: hp[k] for k in ("c", "k_pos", "lambda_pos", "k_neg", "lambda_neg")}
        lfm, dhp = hp.get("lfm", True), hp.get("dhp", True)
        _, zeta, w, m = mhpo_parts(lr, lfm=lfm, dhp=dhp, **kw)
        if name == "mhpo-rescaled":
            w1 = math.exp(-((LN2 / kw["lambda_pos"]) ** kw["k_pos"]) - (LN2 / kw["lambda_neg"]) ** kw["k_neg"])
            w, m = w / w1, m / w1
        return w * adv, m
    raise KeyError(name)


def value(name, logp, lr, adv, mask, hp):
    """Per-token objective j [B, T] (sequence objectives broadcast J_i over the row)."""
    if name == "cispo":
        return torch.exp(lr).clamp(hp["floor"], hp["cap"]) * adv * logp
    if name in ("gspo", "gspo-token"):
        s = torch.exp((lr * mask).sum(-1) / seq_len(mask)).unsqueeze(-1)
        return torch.minimum(s * adv, s.clamp(1 - hp["eps_low"], 1 + hp["eps_high"]) * adv)
    if name == "gmpo":
        a = ((adv * mask).sum(-1) / seq_len(mask)).unsqueeze(-1)
        lc = torch.where(a >= 0, lr.clamp(max=hp["eps_high"]), lr.clamp(min=-hp["eps_low"]))
        rho = torch.exp((lc * mask).sum(-1) / seq_len(mask)).unsqueeze(-1)
        return (a * rho).expand_as(lr)
    return token_level(name, lr, adv, hp)[0]


def grad_J(name, lr, adv, mask, w, hp):
    """Exact dJ/dlogp [B, T] of J = sum w * j (stop-gradients respected), from the sheet."""
    n = seq_len(mask).unsqueeze(-1)  # [B, 1]
    if name in ("gspo", "gspo-token"):
        s = torch.exp((lr * mask).sum(-1, keepdim=True) / n)  # [B, 1]
        unclipped = ~(((adv > 0) & (s > 1 + hp["eps_high"])) | ((adv < 0) & (s < 1 - hp["eps_low"])))
        if name == "gspo-token":  # d s_it / d logp_it = s_i, token by token
            return w * adv * s * unclipped * mask
        # d s_i / d logp_it = s_i / |o_i| for every token of the row
        return mask * (w * adv * unclipped).sum(-1, keepdim=True) * s / n
    if name == "gmpo":
        a = (adv * mask).sum(-1, keepdim=True) / n
        pos = a >= 0
        lc = torch.where(pos, lr.clamp(max=hp["eps_high"]), lr.clamp(min=-hp["eps_low"]))
        rho = torch.exp((lc * mask).sum(-1, keepdim=True) / n)
        unclipped = torch.where(pos, lr <= hp["eps_high"], lr >= -hp["eps_low"])
        return mask * (w * mask).sum(-1, keepdim=True) * a * rho * unclipped / n
    _, m = token_level(name, lr, adv, hp)
    return w * adv * m * mask


def weights(mask, agg, num_tokens=None, num_seqs=None, norm_length=None):
    """Aggregation weights w [B, T] (verl's agg_loss semantics)."""
    lengths = mask.sum(-1, keepdim=True)
    if agg == "token-mean":
        return mask / (num_tokens if num_tokens is not None else max(float(mask.sum()), 1.0))
    n_seq = num_seqs if num_seqs is not None else max(float((lengths > 0).sum()), 1.0)
    if agg == "seq-mean-token-mean":
        return mask / (lengths.clamp(min=1) * n_seq)
    return mask / ((norm_length or mask.shape[-1]) * n_seq)


def k3(logp, ref):
    d = ref - logp
    return torch.exp(d) - d - 1
