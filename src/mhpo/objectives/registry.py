"""The objective registry: one entry per named policy objective, with its formula and hparams.

Every objective is a pure function

    fn(logp, log_r, adv, mask, **hparams) -> Terms

over per-token tensors of shape [B, T] (``adv`` already broadcast to [B, T], ``log_r`` already zero
on masked-out tokens). It returns the per-token objective ``value`` (to be maximised, carrying the
gradient) and the detached per-token gradient multiplier M = (dJ/dlogp) / A, which the diagnostics
and the multiplier plot use. Aggregation, KL and statistics live in :mod:`mhpo.objectives.loss`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mhpo.errors import did_you_mean
from mhpo.rules import RULES

if TYPE_CHECKING:
    from mhpo.objectives.diagnostics import ChunkStats

Tensor = torch.Tensor


@dataclass(frozen=True)
class Terms:
    """What an objective function returns (all [B, T])."""

    value: Tensor  # per-token objective j_t to maximise; carries the gradient
    multiplier: Tensor  # detached M_t = (dj/dlogp_t) / A_t at uniform in-sequence weights
    extras: Mapping[str, Tensor] = field(default_factory=dict)  # detached per-token diagnostics


@dataclass(frozen=True)
class HParam:
    """One hyper-parameter: its default, its range rule (a :data:`mhpo.rules.RULES` key, or 'bool'), and a gloss."""

    default: float | bool | None
    check: str
    help: str


@dataclass(frozen=True)
class Objective:
    """A registered objective: the function, its hparams and a one-line formula for tables."""

    name: str
    fn: Callable[..., Terms]
    hparams: Mapping[str, HParam]
    formula: str
    fixed: Mapping[str, object] = field(default_factory=dict)  # passed to fn, not user-settable
    # Optional fast path: fused(logp, old_logp, coef, *, diagnostics, compiled, per_token, **hparams)
    # -> (loss, parts) or None where it does not apply. coef = w * A; the loss is -sum coef * j/A
    # (per_token: the [B, T] matrix -coef * j/A); parts = (psi, zeta, M) when diagnostics is True;
    # diagnostics may instead be a ChunkStats sink (mhpo.objectives.diagnostics) the kernel fills.
    fused: Callable | None = None

    @property
    def defaults(self) -> dict[str, object]:
        return {k: h.default for k, h in self.hparams.items()}

    @property
    def doc(self) -> str:
        return self.fn.__doc__ or ""

    def resolve(self, overrides: Mapping[str, object]) -> dict[str, object]:
        """Defaults updated by ``overrides``, validated; raises ValueError naming the bad key/value."""
        unknown = [k for k in overrides if k not in self.hparams]
        if unknown:
            valid = ", ".join(self.hparams) or "(none)"
            raise ValueError(
                f"objective {self.name!r}: unknown hparam {unknown[0]!r}{did_you_mean(unknown[0], self.hparams)}; "
                f"valid hparams: {valid}"
            )
        out = self.defaults
        for key, value in overrides.items():
            out[key] = _check_value(self.name, key, value, self.hparams[key])
        return out

    def __call__(self, logp: Tensor, log_r: Tensor, adv: Tensor, mask: Tensor, **hp) -> Terms:
        return self.fn(logp, log_r, adv, mask, **hp, **self.fixed)

    def fast(
        self,
        logp: Tensor,
        old_logp: Tensor,
        coef: Tensor,
        diagnostics: bool | ChunkStats,
        compiled=False,
        per_token=False,
        **hp,
    ):
        """The fused path, or None; ``diagnostics``: False, True (parts returned) or a ChunkStats sink."""
        if self.fused is None:
            return None
        return self.fused(
            logp, old_logp, coef, diagnostics=diagnostics, compiled=compiled, per_token=per_token, **hp, **self.fixed
        )


def _check_value(objective: str, key: str, value: object, spec: HParam):
    where = f"objective {objective!r}: hparam {key}={value!r}"
    if spec.check == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false")
        return value
    if value is None and spec.default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number")
    value = float(value)
    ok, rule = RULES[spec.check]
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"{where} is out of range; it must be {rule}")
    return value


OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    """Add ``objective`` to OBJECTIVES (a name registers once); returns it."""
    if objective.name in OBJECTIVES:
        raise ValueError(f"objective {objective.name!r} is already registered")
    OBJECTIVES[objective.name] = objective
    return objective


def objective(
    name: str,
    *,
    formula: str,
    hparams: Mapping[str, HParam] | None = None,
    fixed: Mapping[str, object] | None = None,
    fused: Callable | None = None,
):
    """Decorator: register the function below as objective ``name`` and return it unchanged.

        @objective("grpo", formula="min(r A, clip(r, 1-eps, 1+eps) A)", hparams=PPO_HPARAMS)
        def ppo_clip(logp, log_r, adv, mask, *, eps_low, eps_high): ...

    Stacked decorators register one function under several names (with other defaults or
    ``fixed`` arguments); the one nearest the function registers first, which sets the order
    ``mhpo objectives`` lists them in.
    """

    def register_fn(fn: Callable[..., Terms]) -> Callable[..., Terms]:
        register(Objective(name, fn, dict(hparams or {}), formula, fixed=dict(fixed or {}), fused=fused))
        return fn

    return register_fn


def get_objective(name: str) -> Objective:
    """The registered objective called ``name``; ValueError listing the valid names otherwise."""
    if not isinstance(name, str) or name not in OBJECTIVES:
        raise ValueError(
            f"unknown objective {name!r}{did_you_mean(str(name), OBJECTIVES)}; "
            f"valid objectives: {', '.join(OBJECTIVES)}"
        )
    return OBJECTIVES[name]


# ---------------------------------------------------------------------------------------------
# Numerics shared by the objectives.

MAX_LOG_RATIO = 80.0  # e^80 ~ 5.5e34: finite in float32/bfloat16 with room for |A| * weights


def sat_exp(x: Tensor, hi: float = MAX_LOG_RATIO) -> Tensor:
    """exp(x) that saturates at exp(hi) instead of overflowing, gradient kept (straight-through).

        value = exp(min(x, hi)),   d value / dx = exp(min(x, hi))

    Below ``hi`` this is exactly exp; above it value and slope are held at e^hi rather than
    becoming inf (unbounded objectives such as `reinforce` would otherwise overflow in float32).
    """
    capped = x.clamp(max=hi)
    return torch.exp(x - (x - capped).detach())


def seq_lengths(mask: Tensor) -> Tensor:
    """|o_i| = number of masked-in tokens per row, [B, T] -> [B], at least 1 (empty rows safe)."""
    return mask.sum(dim=-1).clamp(min=1)


def seq_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Masked mean over each row: sum_t m_t x_t / |o_i|, [B, T] -> [B] (0 for empty rows)."""
    return (x * mask).sum(dim=-1) / seq_lengths(mask)
