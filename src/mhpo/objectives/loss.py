"""`policy_loss` and `token_losses`: one call for every registered objective.

    loss = sum_{i,t} w_it * ( beta * k3_it - j_it )

with j the objective's per-token value (see :mod:`mhpo.objectives`), w the aggregation weights
(see :mod:`mhpo.objectives.aggregation`) and k3 the KL to a reference policy. The loss is to be minimised;
its gradient with respect to logp_it is w_it * (beta * dk3/dlogp - A_it * M(r_it)).

`token_losses` returns the per-token pieces (-j, k3, log r) unaggregated, for engines that
aggregate themselves (verl's agg_loss, TRL's normaliser); `policy_loss` aggregates them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import torch

from mhpo.objectives import Objective, Terms, get_objective
from mhpo.objectives.aggregation import check_agg, row_weights
from mhpo.objectives.diagnostics import DAMPED, ChunkStats, make_chunk_stats, objective_stats
from mhpo.objectives.kl import k3

_HALF = (torch.float16, torch.bfloat16)
IMPLS = ("auto", "compile", "reference")


@dataclass(frozen=True)
class TokenLosses:
    """The per-token pieces of the loss: [B, T], 0 outside the mask."""

    policy: torch.Tensor  # -j_it, carries the gradient
    kl: torch.Tensor | None  # k3_it to the reference (None without ref_logp), carries the gradient
    log_r: torch.Tensor  # logp - old_logp, carries the gradient
    keep: torch.Tensor  # bool mask
    stats: dict[str, float] = field(default_factory=dict)  # diagnostics when asked for ('loss' excluded)


def policy_loss(
    name: str,
    logp: torch.Tensor,  # [B, T] current policy log-probs of the sampled tokens (carries grad)
    old_logp: torch.Tensor,  # [B, T] behaviour policy log-probs
    advantages: torch.Tensor,  # [B] or [B, T]
    mask: torch.Tensor,  # [B, T] bool or {0, 1}
    *,
    agg: str = "token-mean",
    ref_logp: torch.Tensor | None = None,  # [B, T] frozen reference log-probs
    beta: float = 0.0,
    num_tokens: float | None = None,  # global masked-token count over the step (token-mean)
    num_seqs: float | None = None,  # global non-empty sequence count over the step (seq-mean-*)
    norm_length: float | None = None,  # constant L for seq-mean-token-sum-norm (default T)
    stats: bool = True,
    impl: str = "auto",  # "auto": fused kernel (compiled on CUDA) | "compile": compiled everywhere | "reference"
    **hparams,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss (scalar, to minimise) and detached float diagnostics for objective ``name``.

    Half-precision inputs are computed in float32; the loss is float32 then. Global counts make
    k micro-batches (gradient accumulation, data parallel) sum to exactly the full-batch gradient.
    Raises ValueError on an unknown objective, aggregation or hparam, a bad shape, or NaN/inf input.
    """
    check_agg(agg)
    x = _prepare(name, logp, old_logp, advantages, mask, ref_logp, beta, impl, hparams)
    row = row_weights(
        x.keep, agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length, dtype=x.lp.dtype
    )  # [B, 1]
    fast = x.fast(torch.where(x.keep, x.adv * row, 0.0), stats, per_token=False)  # coef = w A, 0 off the mask
    if fast is not None:  # loss = -sum w A exp(psi - sg zeta), analytic backward
        loss, terms = fast
    else:
        terms = x.objective(x.lp, x.log_r, x.adv.expand_as(x.lp), x.m, **x.hp)
        loss = -(terms.value * (x.m * row)).sum()
    kl = x.kl()
    if kl is not None and beta:
        loss = loss + beta * (kl * (x.m * row)).sum()
    out: dict[str, float] = {}
    if stats:
        out = x.stats(terms, kl)
        out["loss"] = float(loss.detach())
    return loss, out


def token_losses(
    name: str,
    logp: torch.Tensor,  # [B, T]
    old_logp: torch.Tensor,  # [B, T]
    advantages: torch.Tensor,  # [B] or [B, T]
    mask: torch.Tensor,  # [B, T]
    *,
    ref_logp: torch.Tensor | None = None,  # [B, T]
    stats: bool = False,
    impl: str = "auto",
    **hparams,
) -> TokenLosses:
    """The per-token loss -j_it and k3_it, unaggregated (0 outside the mask), as policy_loss forms them:
    ``policy_loss(...) == ((t.policy + beta * t.kl) * token_weights(mask, agg)).sum()``."""
    x = _prepare(name, logp, old_logp, advantages, mask, ref_logp, 0.0, impl, hparams)
    fast = x.fast(torch.where(x.keep, x.adv, 0.0), stats, per_token=True)
    if fast is not None:
        policy, terms = fast
    else:
        terms = x.objective(x.lp, x.log_r, x.adv.expand_as(x.lp), x.m, **x.hp)
        policy = torch.where(x.keep, -terms.value, torch.zeros_like(x.lp))
    kl = x.kl()
    if kl is not None:
        kl = torch.where(x.keep, kl, torch.zeros_like(kl))
    return TokenLosses(policy, kl, x.log_r, x.keep, x.stats(terms, kl) if stats else {})


@dataclass
class _Prepared:
    """Validated inputs in the compute dtype (float32 for half precision)."""

    name: str
    objective: Objective
    hp: Mapping[str, object]
    impl: str
    lp: torch.Tensor  # [B, T], carries the gradient
    old: torch.Tensor  # [B, T]
    adv: torch.Tensor  # [B, 1] or [B, T]
    keep: torch.Tensor  # [B, T] bool
    ref: torch.Tensor | None  # [B, T]

    @cached_property
    def m(self) -> torch.Tensor:  # [B, T] 0/1 in the compute dtype (not built on the fused path)
        return self.keep.to(self.lp.dtype)

    @cached_property
    def log_r(self) -> torch.Tensor:  # [B, T] logp - old_logp, 0 outside the mask; carries the gradient
        return torch.where(self.keep, self.lp - self.old, torch.zeros_like(self.lp))

    def fast(self, coef: torch.Tensor, diagnostics: bool, per_token: bool):
        """The objective's fused path with per-token coefficients coef, or None; the second item
        is the diagnostics (when asked for): a ChunkStats the eager kernel filled, Terms (compiled), or None."""
        if self.impl == "reference" or self.objective.fused is None:
            return None
        compiled = use_compiled_kernel(self.impl, self.lp.device)
        sink = self.chunk_stats() if diagnostics and not compiled else None
        out = self.objective.fast(
            self.lp,
            self.old,
            coef,
            sink if sink is not None else diagnostics,
            compiled=compiled,
            per_token=per_token,
            **self.hp,
        )
        if out is None:
            return None
        value, parts = out
        terms = sink
        if diagnostics and sink is None:  # parts = (psi, zeta, M)
            terms = Terms(value, parts[2], {"psi": parts[0], "zeta": parts[1], "survival": torch.exp(-parts[1])})
        return value, terms

    def clip_threshold(self):
        """0.1 * M(1) per token's advantage sign: a 0-d tensor when M(1) does not depend on the sign."""
        ref_m = _on_policy_multiplier(self.name, tuple(sorted(self.hp.items())), self.lp.dtype)  # A>0, A<=0
        if ref_m[0] == ref_m[1]:
            return DAMPED * torch.tensor(ref_m[0])
        return DAMPED * torch.where(self.adv > 0, ref_m[0], ref_m[1])  # [B, 1] or [B, T]

    def chunk_stats(self) -> ChunkStats:
        """A diagnostics sink for the fused kernel; its percentile sample of log r is read here, before it."""
        lp, old = self.lp.detach().reshape(-1), self.old.reshape(-1)
        keys = [f"mhpo/{k}_mean" for k in ("psi", "zeta", "survival")]
        return make_chunk_stats(lambda i: lp[i] - old[i], self.keep, self.clip_threshold(), keys=keys)

    def kl(self) -> torch.Tensor | None:
        if self.ref is None:
            return None
        return k3(self.lp, torch.where(self.keep, self.ref, self.lp.detach()))  # [B, T]

    def stats(self, terms, kl: torch.Tensor | None) -> dict[str, float]:
        """The diagnostics (see mhpo.objectives.diagnostics) from a filled ChunkStats or from Terms."""
        if isinstance(terms, ChunkStats):
            if kl is not None:
                terms.add_full("kl", kl, self.lp.dtype)
            return terms.result()
        ref_m = _on_policy_multiplier(self.name, tuple(sorted(self.hp.items())), self.lp.dtype)  # A>0, A<=0
        on_policy = torch.where(self.adv > 0, ref_m[0], ref_m[1])  # [B, 1] or [B, T]
        return objective_stats(self.log_r.detach(), self.keep, terms.multiplier, on_policy, terms.extras, kl)


def use_compiled_kernel(impl: str, device: torch.device) -> bool:
    """Whether a fused objective runs its torch.compile kernel: always for impl="compile"; for
    "auto" on CUDA where triton is installed (one fused kernel instead of a dozen eager ones), never
    on CPU (there the chunked eager kernel keeps its temporaries in cache and needs no compiler)."""
    if impl == "compile":
        return True
    return impl == "auto" and device.type == "cuda" and _has_triton()


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


def _prepare(name, logp, old_logp, advantages, mask, ref_logp, beta, impl, hparams) -> _Prepared:
    objective = get_objective(name)
    hp = objective.resolve(hparams)
    if impl not in IMPLS:
        raise ValueError(f"policy_loss: unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
    _check_inputs(logp, old_logp, advantages, mask, ref_logp, beta)
    dtype = torch.float32 if logp.dtype in _HALF else logp.dtype
    keep = mask.bool()
    lp = logp.to(dtype)
    old = old_logp.to(dtype)
    adv = advantages.to(dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    ref = ref_logp.to(dtype) if ref_logp is not None else None
    return _Prepared(name, objective, hp, impl, lp, old, adv, keep, ref)


@lru_cache(maxsize=256)
def _on_policy_multiplier(name: str, hp_items: tuple, dtype: torch.dtype) -> tuple[float, float]:
    """M(r = 1) for A = +1 and A = -1: the reference for the generalised clip fraction."""
    z = torch.zeros(2, 1, dtype=dtype)
    adv = torch.tensor([[1.0], [-1.0]], dtype=dtype)
    terms = get_objective(name)(z, z, adv, torch.ones_like(z), **dict(hp_items))
    return float(terms.multiplier[0, 0]), float(terms.multiplier[1, 0])


def _check_inputs(logp, old_logp, advantages, mask, ref_logp, beta) -> None:
    tensors = {"logp": logp, "old_logp": old_logp, "advantages": advantages, "mask": mask}
    if ref_logp is not None:
        tensors["ref_logp"] = ref_logp
    for arg, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"policy_loss: {arg!r} must be a torch.Tensor, got {type(t).__name__}")
    if logp.dim() != 2:
        raise ValueError(f"policy_loss: 'logp' must have shape [B, T]; got {tuple(logp.shape)}")
    shape = tuple(logp.shape)
    for arg in ("old_logp", "mask", "ref_logp"):
        if arg in tensors and tuple(tensors[arg].shape) != shape:
            raise ValueError(
                f"policy_loss: {arg!r} has shape {tuple(tensors[arg].shape)}; expected {shape} like 'logp'"
            )
    if tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(
            f"policy_loss: 'advantages' has shape {tuple(advantages.shape)}; expected {shape[:1]} or {shape}"
        )
    for arg in ("logp", "old_logp", "advantages", "ref_logp"):
        if arg in tensors and not tensors[arg].is_floating_point():
            raise ValueError(f"policy_loss: {arg!r} must be a floating-point tensor; got {tensors[arg].dtype}")
    devices = {str(t.device) for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError(f"policy_loss: all tensors must be on one device; got {sorted(devices)}")
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        raise ValueError("policy_loss: 'mask' must be bool or hold only 0 and 1")
    for arg in ("logp", "old_logp", "advantages", "ref_logp"):
        if arg in tensors:
            _check_finite(arg, tensors[arg])
    if not isinstance(beta, (int, float)) or beta < 0 or beta != beta:
        raise ValueError(f"policy_loss: beta={beta!r} must be a number >= 0")
    if beta and ref_logp is None:
        raise ValueError(f"policy_loss: beta={beta} needs 'ref_logp' (the reference policy's log-probs)")


def _check_finite(arg: str, t: torch.Tensor) -> None:
    """ValueError if t holds NaN or inf. One reduction: a NaN or inf anywhere makes the sum
    non-finite; only then (or if finite values overflowed the sum) is each element checked.
    The sum runs in t's own dtype (float32 for half precision): a float64 sum of float32 data
    measured ~6x slower here, and an overflow only sends the check down the exact path."""
    d = t.detach()
    if torch.isfinite(d.sum(dtype=torch.float32) if d.dtype in _HALF else d.sum()):
        return
    bad = ~torch.isfinite(t)
    if bad.any():
        raise ValueError(f"policy_loss: {arg!r} contains NaN or inf ({int(bad.sum())} of {bad.numel()} elements)")
