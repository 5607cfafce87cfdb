"""MHPO's loss and its analytic backward in one chunked pass: the same numbers as `mhpo_terms`.

With per-token coefficients coef_it = w_it * A_it (aggregation weight times advantage) the MHPO
part of the loss and its gradient are

    loss        = -sum_it coef_it * exp(psi_it - zeta_it)
    dloss/dlogp = -coef_it * M_it,     M = exp(psi - zeta) * (1 - tanh^2(log r / c))

so forward computes M on the way and saves the single tensor -coef*M; backward is one multiply.
The work runs over chunks of CHUNK tokens so that the dozen temporaries of a chunk stay in cache
instead of streaming 16-byte-per-token intermediates through memory. Per token this costs one
tanh, one softplus (exp + log1p) and one exp: the transcendental floor of the formula.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mhpo.objectives.mhpo_formula import dhp, lfm, power

if TYPE_CHECKING:
    from mhpo.objectives.diagnostics import ChunkStats

CHUNK = 1 << 18  # tokens per chunk: a float32 temporary is 1 MiB, so a dozen fit a 32 MiB L3 (not a 2 MiB L2)


def _chunk(x, coef, *, c, k_pos, lambda_pos, k_neg, lambda_neg, out, stats, values, sink=None):
    """One chunk of :mod:`mhpo.objectives.mhpo_formula`, in place: x [n] = log r (overwritten, and
    its buffer reused for tanh, then tanh^2), coef [n] = w*A; writes out [n] = coef * M and returns
    sum coef * exp(psi - zeta) (or writes -coef * exp(psi - zeta) to ``values``).
    zeta = a s^k_pos + b d^k_neg, a = lambda_pos^-k_pos, b = lambda_neg^-k_neg, s = softplus(psi),
    d = softplus(-psi) = s - psi."""
    a, b = lambda_pos ** (-k_pos), lambda_neg ** (-k_neg)
    t = x.mul_(1.0 / c).tanh_()  # tanh(log r / c)
    psi = t * c  # LFM
    sp = F.softplus(psi)
    u = power(sp, k_pos).add_(power(sp.sub_(psi), k_neg), alpha=b / a)  # zeta / a
    if stats is not None:
        stats[0].copy_(psi)
        torch.mul(u, a, out=stats[1])
    if sink is not None:  # diagnostics reduced here, while the chunk is in cache (diagnostics.ChunkStats)
        sink.mean("mhpo/psi_mean", psi)
        sink.zeta(u, a)
    w = psi.sub_(u, alpha=a).exp_()  # exp(psi - zeta)
    t2 = t.mul_(t)  # tanh^2
    if stats is not None:
        torch.addcmul(w, w, t2, value=-1.0, out=stats[2])  # M = w * (1 - tanh^2)
    if sink is not None:
        sink.multiplier_from(w, t2)
    cw = w.mul_(coef)  # coef * exp(psi - zeta)
    if values is not None:
        torch.neg(cw, out=values)
        part = 0.0
    else:
        part = cw.sum()  # in the chunk's dtype (a float64 sum converts the chunk first: ~6x slower)
    torch.addcmul(cw, cw, t2, value=-1.0, out=out)  # coef * M
    return part


def whole_kernel(logp, old_logp, coef, *, c, k_pos, lambda_pos, k_neg, lambda_neg, diagnostics, per_token):
    """The formula of :mod:`mhpo.objectives.mhpo_formula` as one whole-tensor expression, for
    torch.compile to fuse into a single loop.

    Returns (sum coef*w or the [N] vector -coef*w, coef*M) and, with diagnostics (a bool here), (psi, zeta, M).
    """
    psi = lfm(logp - old_logp, c)
    t = psi / c  # tanh(log r / c)
    zeta = dhp(psi, k_pos, lambda_pos, k_neg, lambda_neg)
    w = torch.exp(psi - zeta)
    m = w * (1.0 - t * t)
    cw = coef * w
    out = (-cw if per_token else cw.sum(dtype=torch.float64), coef * m)
    return out + ((psi, zeta, m) if diagnostics else ())


_COMPILED = None


def compiled_kernel():
    """torch.compile(whole_kernel), built on first use (inductor needs a C++ compiler on CPU)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(whole_kernel, dynamic=True)
    return _COMPILED


class MHPOLoss(torch.autograd.Function):
    """loss = -sum coef * exp(psi - sg zeta) (or per token: -coef * exp(psi - sg zeta), [N]).

    Gradient flows to logp only: d/dlogp = -coef * M, the one saved tensor (negated)."""

    @staticmethod
    def forward(ctx, logp, old_logp, coef, hp, diagnostics, compiled, per_token):  # [N] contiguous
        if compiled:
            value, grad, *stats = compiled_kernel()(
                logp, old_logp, coef, **hp, diagnostics=diagnostics, per_token=per_token
            )
        else:
            value, grad, stats = _chunked(logp, old_logp, coef, hp, diagnostics, per_token)
        ctx.save_for_backward(grad)
        outs = (value if per_token else -value.to(logp.dtype), *stats)
        ctx.mark_non_differentiable(*outs[1:])
        return outs if diagnostics is True else outs[0]

    @staticmethod
    def backward(ctx, g, *_stats_grads):
        (grad,) = ctx.saved_tensors
        return grad * -g, None, None, None, None, None, None


def chunk_size(device: torch.device, n: int) -> int:
    """Tokens per chunk: cache-sized on CPU; on an accelerator one chunk (a loop would only add
    kernel launches; the fused form still saves the backward graph and its temporaries)."""
    return max(min(CHUNK if device.type == "cpu" else n, n), 1)


def _chunked(logp, old_logp, coef, hp, diagnostics: bool | ChunkStats, per_token):
    """The chunk loop: (sum coef*w or [N] -coef*w, coef*M [N], [psi, zeta, M] or []).

    diagnostics: True for the [N] tensors psi, zeta, M; or a sink (mhpo.objectives.diagnostics.ChunkStats)
    that reduces them chunk by chunk, with no [N] outputs; or False."""
    n = logp.numel()
    chunk = chunk_size(logp.device, n)
    grad = torch.empty_like(logp)  # coef * M = -d loss / d logp
    sink = None if isinstance(diagnostics, bool) else diagnostics
    stats = [torch.empty_like(logp) for _ in range(3)] if diagnostics is True else []  # psi, zeta, M
    values = torch.empty_like(logp) if per_token else None
    buf = torch.empty(chunk, dtype=logp.dtype, device=logp.device)
    total = torch.zeros((), dtype=torch.float64, device=logp.device)  # sum over chunks of coef * w, in float64
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        x = torch.sub(logp[s:e], old_logp[s:e], out=buf[: e - s])
        chunk_stats = [b[s:e] for b in stats] if diagnostics is True else None
        if sink is not None:
            sink.tokens(s, e, x.dtype)
            sink.log_ratio(x)  # before _chunk overwrites x
        values_chunk = values[s:e] if per_token else None
        total += _chunk(x, coef[s:e], **hp, out=grad[s:e], stats=chunk_stats, values=values_chunk, sink=sink)
    return (values if per_token else total), grad, stats


def mhpo_fused_loss(
    logp,
    old_logp,
    coef,
    *,
    c,
    k_pos,
    lambda_pos,
    k_neg,
    lambda_neg,
    diagnostics: bool | ChunkStats = False,
    compiled=False,
    per_token=False,
):
    """Fused MHPO on [B, T] tensors: the loss -sum coef*w (per_token: the [B, T] matrix -coef*w),
    and with diagnostics=True also (psi, zeta, M) as [B, T] tensors; diagnostics may instead be a
    sink (mhpo.objectives.diagnostics.ChunkStats) fed chunk by chunk (eager kernel only), parts then None."""
    shape = logp.shape
    flat = [t.contiguous().view(-1) for t in (logp, old_logp.to(logp.dtype), coef.to(logp.dtype))]
    hp = {"c": c, "k_pos": k_pos, "lambda_pos": lambda_pos, "k_neg": k_neg, "lambda_neg": lambda_neg}
    if compiled and not isinstance(diagnostics, bool):
        raise ValueError("mhpo_fused_loss: a stats sink needs the eager kernel (compiled=False)")
    out = MHPOLoss.apply(flat[0], flat[1], flat[2].detach(), hp, diagnostics, compiled, per_token)
    value, parts = (out[0], out[1:]) if diagnostics is True else (out, None)
    value = value.view(shape) if per_token else value
    return value, (tuple(t.view(shape) for t in parts) if parts is not None else None)
