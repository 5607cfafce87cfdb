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

Where mhpo's objective has the name of a verl loss, the plug-in computes what verl's loss computes
or refuses (ValueError naming the loss mode to use instead):

    mhpo.gspo   refuses advantages or IS weights that vary within a sequence (there verl's gspo is
                GSPO-token: use mhpo.gspo-token, equal to verl's gspo for every input)
    mhpo.gmpo   refuses advantages that vary within a sequence; IS weights enter as verl's geo_mean
                takes them, their geometric mean over each sequence

Metrics under verl's keys (actor/ppo_kl, actor/pg_clipfrac, actor/pg_clipfrac_lower) mean what verl's
loss of the same name reports; mhpo's own measures are under actor/objective/<key>.

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
        check_inputs(objective, advantages, response_mask, rollout_is_weights)
        parts = token_losses(objective, log_prob, old_log_prob, advantages, response_mask, stats=True, **hp)
        weights = is_weights(objective, rollout_is_weights, response_mask)  # [B, T], [B, 1] or None
        loss_mat = parts.policy if weights is None else parts.policy * weights
        pg_loss = agg_loss(
            loss_mat=loss_mat, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **_batch_info(config)
        )
        return pg_loss, metrics(objective, hp, parts, advantages)

    loss_fn.__name__ = f"mhpo_policy_loss_{objective.replace('-', '_')}"
    loss_fn.__qualname__ = loss_fn.__name__
    loss_fn.__doc__ = (
        f"verl policy loss for mhpo objective {objective!r}: agg_loss(-j * rollout_is_weights, mask, mode, "
        "**config.global_batch_info); see mhpo.integrations.verl for the IS weights of gmpo and the metrics."
    )
    loss_fn.mhpo_objective = objective
    return loss_fn


# -- where a sequence-level objective would silently differ from verl's own loss of that name --------------

# objective -> (inputs that must be constant within each sequence, what to use otherwise)
_SEQUENCE_LEVEL = {
    "gspo": (("advantages", "rollout_is_weights"), "mhpo.gspo-token (equal to verl's gspo for every input)"),
    "gmpo": (("advantages",), "a sequence-level advantage estimator (grpo, rloo, ...), as verl's geo_mean assumes"),
}
ROW_TOL = 1e-6  # relative spread within a row that still counts as one value per sequence


def varies_within_rows(x: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether ``x`` [B, T] takes more than one value over the masked tokens of some row:
    max_t x_it - min_t x_it > ROW_TOL * max(1, max_t |x_it|)  (over m_it = 1)."""
    keep = mask.bool()
    hi = torch.where(keep, x, torch.full_like(x, -torch.inf)).amax(-1)  # [B]
    lo = torch.where(keep, x, torch.full_like(x, torch.inf)).amin(-1)  # [B]
    rows = keep.any(-1)
    scale = torch.maximum(hi.abs(), lo.abs()).clamp(min=1.0)
    return bool(((hi - lo)[rows] > ROW_TOL * scale[rows]).any())


def check_inputs(
    objective: str,
    advantages: torch.Tensor,  # [B, T] (or [B])
    mask: torch.Tensor,  # [B, T]
    rollout_is_weights: torch.Tensor | None,  # [B, T]
) -> None:
    """ValueError where mhpo's sequence-level objective and verl's loss of the same name would differ.

    gspo: mhpo differentiates the sequence ratio s_i = exp(mean_t log r_it), so every token of
    sequence i gets sum_u w_iu A_iu s_i / |o_i|; verl's gspo is GSPO-token (token t gets w_it A_it s_i).
    They agree when A and the IS weights w are constant within each sequence.
    gmpo: mhpo clips each token's log r by the sign of its sequence's advantage, verl's geo_mean by the
    token's own; they agree when A is constant within each sequence.
    """
    if objective not in _SEQUENCE_LEVEL:
        return
    names, instead = _SEQUENCE_LEVEL[objective]
    inputs = {"advantages": advantages, "rollout_is_weights": rollout_is_weights}
    for name in names:
        x = inputs[name]
        if x is not None and x.dim() == 2 and varies_within_rows(x, mask):
            raise ValueError(
                f"loss_mode=mhpo.{objective}: {name} vary within a sequence, where mhpo's sequence-level "
                f"{objective} differs from verl's; use {instead}"
            )


def is_weights(objective: str, rollout_is_weights: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    """The rollout-correction factor of each token's loss: verl's ``rollout_is_weights`` [B, T] as given,
    except for gmpo, whose loss is per sequence, where it is verl's geo_mean sequence weight [B, 1]

        w_i = exp( (1/|o_i|) sum_t m_it log(w_it + 1e-10) )      (geometric mean over the sequence)
    """
    if rollout_is_weights is None or objective != "gmpo":
        return rollout_is_weights
    m = mask.to(rollout_is_weights.dtype)
    mean_log = (torch.log(rollout_is_weights + 1e-10) * m).sum(-1) / m.sum(-1).clamp(min=1.0)  # [B]
    return torch.exp(mean_log).unsqueeze(-1)


# -- metrics: verl's keys with verl's meaning; mhpo's own measures under actor/objective/ ------------------

LOG_R_CLAMP = 20.0  # verl's vanilla / cispo / sapo clamp log r to +-20 before exp (and for ppo_kl)
_CLAMPS_LOG_R = ("grpo", "dapo", "cispo", "sapo")


def _masked_frac(flags: torch.Tensor, keep: torch.Tensor) -> float:
    """Share of the masked tokens where ``flags`` [B, T] is true (0 without tokens)."""
    n = int(keep.sum())
    return float((flags & keep).sum()) / n if n else 0.0


def _ppo_clip(hp, log_r, adv, keep):
    """vanilla: clipped where the clip branch wins, (A > 0, r > 1 + eps_high) or (A < 0, r < 1 - eps_low);
    lower = dual-clipped, A < 0 and r > dual_clip (verl's clip_ratio_c), none when dual clip is off."""
    r = torch.exp(log_r.clamp(-LOG_R_CLAMP, LOG_R_CLAMP))
    clipped = ((adv > 0) & (r > 1 + hp["eps_high"])) | ((adv < 0) & (r < 1 - hp["eps_low"]))
    lower = None if hp.get("dual_clip") is None else (adv < 0) & (r > hp["dual_clip"])
    return clipped, lower


def _gspo_clip(hp, log_r, adv, keep):
    """gspo: s_i = exp(min(mean_t log r_it, 10)); clipped where (A > 0, s > 1 + eps_high) or (A < 0, s < 1 - eps_low)"""
    m = keep.to(log_r.dtype)
    s = torch.exp(((log_r * m).sum(-1) / m.sum(-1).clamp(min=1.0)).clamp(max=10.0)).unsqueeze(-1)  # [B, 1]
    return ((adv > 0) & (s > 1 + hp["eps_high"])) | ((adv < 0) & (s < 1 - hp["eps_low"])), None


def _cispo_clip(hp, log_r, adv, keep):
    """cispo: the IS weight was clipped, r > cap or r < floor (either sign of A)."""
    r = torch.exp(log_r.clamp(-LOG_R_CLAMP, LOG_R_CLAMP))
    return (r > hp["cap"]) | (r < hp["floor"]), None


def _gmpo_clip(hp, log_r, adv, keep):
    """geo_mean: log r outside [-eps_low, eps_high]; pg_clipfrac counts it where A > 0, lower where A < 0."""
    outside = (log_r > hp["eps_high"]) | (log_r < -hp["eps_low"])
    return outside & (adv > 0), outside & (adv < 0)


def _no_clip(hp, log_r, adv, keep):
    """sapo: nothing is clipped (verl reports 0 for both fractions)."""
    return torch.zeros_like(keep), None


# objective -> its verl counterpart's clip flags ([B, T] bool for pg_clipfrac, and for pg_clipfrac_lower or None)
VERL_CLIP = {
    "grpo": _ppo_clip,
    "dapo": _ppo_clip,
    "gspo": _gspo_clip,
    "gspo-token": _gspo_clip,
    "sapo": _no_clip,
    "cispo": _cispo_clip,
    "gmpo": _gmpo_clip,
}


@torch.no_grad()
def metrics(objective: str, hp: dict, parts: TokenLosses, advantages: torch.Tensor) -> dict[str, float]:
    """Metrics under verl's keys, each as verl's loss of the same name computes it, then mhpo's own:

    actor/ppo_kl              mean over tokens of -log r (log r clamped to +-20 where verl's loss clamps it)
    actor/pg_clipfrac         share of tokens verl's counterpart counts as clipped (see VERL_CLIP);
    actor/pg_clipfrac_lower   its dual-clip / lower share (0 where it has none);
                              both left out for objectives verl has no counterpart of (mhpo, reinforce)
    actor/objective/<key>     every policy_loss diagnostic, e.g. clip_frac = share of tokens whose
                              gradient multiplier is below 10% of its on-policy value (mhpo's measure)
    """
    keep = parts.keep
    log_r = parts.log_r.detach()
    if objective in _CLAMPS_LOG_R:
        log_r = log_r.clamp(-LOG_R_CLAMP, LOG_R_CLAMP)
    out = {"actor/ppo_kl": float(-log_r[keep].double().mean()) if bool(keep.any()) else 0.0}
    if objective in VERL_CLIP:
        adv = advantages.detach()
        adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv  # [B, 1] or [B, T]
        clipped, lower = VERL_CLIP[objective](hp, parts.log_r.detach(), adv, keep)
        out["actor/pg_clipfrac"] = _masked_frac(clipped, keep)
        out["actor/pg_clipfrac_lower"] = 0.0 if lower is None else _masked_frac(lower, keep)
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
