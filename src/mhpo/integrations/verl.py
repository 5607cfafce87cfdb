"""verl plug-in (verified against verl 0.9.1): every mhpo objective as a verl policy loss, no fork.

Importing this module registers, in verl's ``POLICY_LOSS_REGISTRY``,

    mhpo              MHPO (paper defaults unless overridden)
    mhpo.<objective>  every objective of :mod:`mhpo.objectives`: mhpo.grpo, mhpo.gspo, mhpo.gmpo, ...

(prefixed so that none clashes with verl's own vanilla / gspo / sapo / cispo / geo_mean ...).
``pip install mhpo`` declares it as a ``verl.plugins`` entry point, which ``import verl`` (>= 0.9)
loads in every process, Ray workers included; ``VERL_USE_EXTERNAL_MODULES=mhpo.integrations.verl``
is the fallback where entry points are disabled (``VERL_USE_EXTERNAL_PLUGINS=none``).

The loss of one micro-batch is verl's aggregation of our per-token loss matrix:

    pg_loss = agg_loss(loss_mat = -j * rollout_is_weights, response_mask, loss_agg_mode,
                       **config.global_batch_info)

``global_batch_info`` (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor) makes the
micro-batches of one mini-batch, averaged over data-parallel ranks, sum to the mini-batch loss;
for token-mean / seq-mean-token-mean / seq-mean-token-sum-norm that equals
``dp_size * policy_loss(..., num_tokens=batch_num_tokens, num_seqs=global_batch_size,
norm_length=loss_scale_factor)`` on each micro-batch. The KL to the reference stays verl's
(``actor.use_kl_loss``, ``kl_loss_coef``, ``kl_loss_type``).

Hyper-parameters: select :class:`MHPOPolicyLossConfig` and add its keys (verl's config is struct
and its dataclasses are frozen, so plain overrides of new keys fail):

    actor_rollout_ref.actor.policy_loss._target_=mhpo.integrations.verl.MHPOPolicyLossConfig
    +actor_rollout_ref.actor.policy_loss.mhpo_c=1.0
    +actor_rollout_ref.actor.policy_loss.mhpo_hparams='{eps_high: 0.28}'      # any objective
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from mhpo.integrations import MHPO_FIELDS, merge_hparams, resolve_hparams
from mhpo.objectives import OBJECTIVES
from mhpo.objectives.loss import TokenLosses, token_losses

try:
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, agg_loss, register_policy_loss
    from verl.workers.config import PolicyLossConfig

    import verl
except ImportError as err:  # pragma: no cover - exercised only without verl
    raise ImportError("mhpo.integrations.verl needs verl 0.9: pip install 'mhpo[verl]'") from err

__all__ = ["LOSS_MODES", "MHPOPolicyLossConfig", "objective_hparams", "TESTED_VERL"]

TESTED_VERL = "0.9"
if not str(getattr(verl, "__version__", "")).startswith(TESTED_VERL + "."):
    warnings.warn(
        f"mhpo.integrations.verl was verified against verl {TESTED_VERL}.x; found verl "
        f"{getattr(verl, '__version__', 'unknown')}",
        RuntimeWarning,
        stacklevel=2,
    )

# verl loss_mode -> mhpo objective
LOSS_MODES: dict[str, str] = {"mhpo": "mhpo", **{f"mhpo.{name}": name for name in OBJECTIVES}}


def _mhpo_field():
    return field(default=None)


@dataclass
class MHPOPolicyLossConfig(PolicyLossConfig):
    """verl's PolicyLossConfig plus the objective's hyper-parameters (None = the objective's default).

    ``mhpo_c`` ... ``mhpo_lambda_neg`` are MHPO's (the mhpo family only); ``mhpo_hparams`` takes any
    objective's, e.g. ``{"eps_high": 0.28}`` for ``loss_mode=mhpo.dapo``. Validated on construction.
    """

    mhpo_c: float | None = _mhpo_field()
    mhpo_k_pos: float | None = _mhpo_field()
    mhpo_lambda_pos: float | None = _mhpo_field()
    mhpo_k_neg: float | None = _mhpo_field()
    mhpo_lambda_neg: float | None = _mhpo_field()
    mhpo_hparams: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.loss_mode in LOSS_MODES:
            objective_hparams(self, LOSS_MODES[self.loss_mode])
            return
        given = sorted(f"mhpo_{k}" for k in MHPO_FIELDS if getattr(self, f"mhpo_{k}") is not None)
        if given or self.mhpo_hparams:
            raise ValueError(
                f"policy_loss.loss_mode={self.loss_mode!r} is not an mhpo loss, but mhpo hparams are set "
                f"({', '.join(given + (['mhpo_hparams'] if self.mhpo_hparams else []))}); "
                f"valid mhpo loss modes: {', '.join(LOSS_MODES)}"
            )


def objective_hparams(policy_loss_config: Any, objective: str) -> dict:
    """Resolved hparams of ``objective`` from a policy_loss config (our subclass, verl's, a DictConfig or None)."""
    cfg = policy_loss_config if policy_loss_config is not None else {}
    named = {key: cfg.get(f"mhpo_{key}", None) for key in MHPO_FIELDS}
    extra = cfg.get("mhpo_hparams", None) or {}
    where = f"verl policy_loss (loss_mode={cfg.get('loss_mode', None)!r}, objective {objective!r})"
    return resolve_hparams(objective, merge_hparams(named, dict(extra), where=where), where=where)


def _batch_info(config: Any) -> dict:
    if config is None:
        return {}
    info = config.get("global_batch_info", None)
    return dict(info) if info else {}


def _make_loss(objective: str):
    def loss_fn(
        old_log_prob: torch.Tensor,  # [B, T]
        log_prob: torch.Tensor,  # [B, T], carries the gradient
        advantages: torch.Tensor,  # [B, T]
        response_mask: torch.Tensor,  # [B, T]
        loss_agg_mode: str = "token-mean",
        config: Any | None = None,  # verl ActorConfig (or DictConfig); None = local normalisation
        rollout_is_weights: torch.Tensor | None = None,  # [B, T] rollout-correction weights
    ) -> tuple[torch.Tensor, dict[str, float]]:
        hp = objective_hparams(config.get("policy_loss", None) if config is not None else None, objective)
        parts = token_losses(objective, log_prob, old_log_prob, advantages, response_mask, stats=True, **hp)
        loss_mat = parts.policy if rollout_is_weights is None else parts.policy * rollout_is_weights
        pg_loss = agg_loss(
            loss_mat=loss_mat, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **_batch_info(config)
        )
        return pg_loss, _metrics(parts)

    loss_fn.__name__ = f"mhpo_policy_loss_{objective.replace('-', '_')}"
    loss_fn.__qualname__ = loss_fn.__name__
    loss_fn.__doc__ = (
        f"verl policy loss for mhpo objective {objective!r}: agg_loss(-j * rollout_is_weights, mask, mode, "
        "**config.global_batch_info); metrics are policy_loss's diagnostics."
    )
    loss_fn.mhpo_objective = objective
    return loss_fn


@torch.no_grad()
def _metrics(parts: TokenLosses) -> dict[str, float]:
    """verl's actor/pg_clipfrac (our generalised clip fraction) and actor/ppo_kl = mean(-log r), plus
    every ``policy_loss`` diagnostic as actor/objective/<key>."""
    keep = parts.keep
    out = {
        "actor/pg_clipfrac": parts.stats["clip_frac"],
        "actor/ppo_kl": float(-parts.log_r.detach()[keep].double().mean()) if bool(keep.any()) else 0.0,
    }
    out.update({f"actor/objective/{k}": v for k, v in parts.stats.items() if k not in ("loss", "tokens")})
    return out


def register() -> None:
    """Register every entry of LOSS_MODES with verl; refuses to replace a loss that is not ours."""
    for mode, objective in LOSS_MODES.items():
        existing = POLICY_LOSS_REGISTRY.get(mode)
        if existing is not None and getattr(existing, "mhpo_objective", None) is None:
            raise RuntimeError(f"verl already has a policy loss named {mode!r} that is not mhpo's; not replacing it")
        register_policy_loss(mode)(_make_loss(objective))


register()
