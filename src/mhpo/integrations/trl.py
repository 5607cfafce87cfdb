"""MHPO and every registered objective inside TRL's GRPOTrainer (verified against trl 1.16.0).

    from mhpo.integrations.trl import MHPOConfig, MHPOTrainer
    args = MHPOConfig(output_dir="out", objective="mhpo", num_iterations=2)     # paper defaults
    args = MHPOConfig(output_dir="out", loss_type="grpo", num_iterations=2)     # TRL's grpo loss (LOSS_TYPES)
    trainer = MHPOTrainer(model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok)

TRL has no loss hook, so ``_compute_loss`` is overridden. One micro-batch returns

    L = sum_{i,t} w_it * ( s_it * (-j_it) + beta * k3_it )   [ - entropy_coef * H + router aux loss ]

with j the objective (:mod:`mhpo.objectives`), k3 the KL to the reference (TRL's ``beta``), s_it
TRL's per-token factors (high-entropy mask, off-policy sequence mask, vLLM importance-sampling
correction; 1 when off) and w the weights of :func:`mhpo.policy_loss` for ``loss_agg_mode`` with
the generation batch's global counts, rescaled to one gradient-accumulation window (TRL's own
``dapo`` convention, applied to every mode):

    train:  N_tok = num_items_in_batch / P * G / S     N_seq = num_seqs_in_batch / P * G / S
    eval:   N_tok = num_items_in_batch / P             N_seq = num_seqs_in_batch / P

(P processes, G = gradient-accumulation steps of the window, S = steps_per_generation; the two
counts are over every process's share of the generation batch.) When S = G the G micro-batches of
one optimizer step, averaged over the P processes, sum to ``policy_loss`` over the generation
batch. With s = 1 the loss equals ``policy_loss(objective, logp, old_logp, A, mask, agg=...,
num_tokens=N_tok, num_seqs=N_seq, norm_length=max_completion_length, ref_logp=ref, beta=beta)``.

With one update per generation batch (``gradient_accumulation_steps`` a multiple of
``steps_per_generation * num_iterations``) TRL passes old log-probs = logp.detach(): r = 1
exactly and no ratio control happens. Use ``num_iterations >= 2`` or ``steps_per_generation >
gradient_accumulation_steps``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, fields

import torch

from mhpo.integrations import MHPO_FIELDS, merge_hparams, resolve_hparams
from mhpo.objectives.aggregation import AGG_MODES, check_agg, token_weights
from mhpo.objectives.loss import token_losses

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
except ImportError as err:  # pragma: no cover - exercised only without trl
    raise ImportError("mhpo.integrations.trl needs TRL 1.16: pip install 'mhpo[trl]'") from err

__all__ = ["MHPOConfig", "MHPOTrainer", "TESTED_TRL"]

logger = logging.getLogger(__name__)

TESTED_TRL = "1.16"  # the overridden private methods are those of this minor version
if not str(trl.__version__).startswith(TESTED_TRL + "."):
    warnings.warn(
        f"mhpo.integrations.trl was verified against trl {TESTED_TRL}.x; found trl {trl.__version__}. "
        "MHPOTrainer overrides GRPOTrainer._compute_loss, whose inputs may differ in other versions.",
        RuntimeWarning,
        stacklevel=2,
    )

# Keyword inputs of GRPOTrainer._get_per_token_logps_and_entropies that come from the batch (VLMs).
_MODEL_INPUTS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def _mhpo_field(key: str):
    return field(
        default=None,
        metadata={"help": f"MHPO hparam {key!r} (mhpo family only); None = the objective's default."},
    )


# TRL 1.16 loss_type -> (mhpo objective, aggregation) computing the same loss (tests: test_trl_integration.py)
LOSS_TYPES: dict[str, tuple[str, str]] = {
    "grpo": ("grpo", "seq-mean-token-mean"),
    "dr_grpo": ("grpo", "seq-mean-token-sum-norm"),
    "dapo": ("dapo", "token-mean"),
    "cispo": ("cispo", "token-mean"),
    "sapo": ("sapo", "seq-mean-token-mean"),
}
# TRL loss types without an mhpo counterpart, and what to use instead
NO_COUNTERPART: dict[str, str] = {
    "bnpo": "it normalises by each micro-batch's own token count; use loss_type='dapo' (token-mean over the "
    "generation batch)",
    "luspo": "no mhpo objective scales GSPO by sequence length; use objective='gspo'",
    "vespo": "no mhpo objective has VESPO's gamma weighting; use objective='sapo' or 'mhpo' (smooth weightings)",
}
_CLIP_FIELDS = ("epsilon", "epsilon_high", "delta", "importance_sampling_level")  # read by grpo, dr_grpo, dapo
# TRL's loss fields: read only through loss_type; with objective= they must keep TRL's defaults
TRL_LOSS_FIELDS: dict[str, str] = {
    "epsilon": "objective_hparams={'eps_low': ...}",
    "epsilon_high": "objective_hparams={'eps_high': ...} (cispo: {'cap': ...})",
    "delta": "objective_hparams={'dual_clip': ...}",
    "importance_sampling_level": "objective='gspo' (or 'gspo-token') with importance_sampling_level='token'",
    "sapo_temperature_pos": "objective='sapo' with objective_hparams={'tau_pos': ...}",
    "sapo_temperature_neg": "objective='sapo' with objective_hparams={'tau_neg': ...}",
    "vespo_k_pos": "another objective (mhpo has no VESPO)",
    "vespo_lambda_pos": "another objective (mhpo has no VESPO)",
    "vespo_k_neg": "another objective (mhpo has no VESPO)",
    "vespo_lambda_neg": "another objective (mhpo has no VESPO)",
}


def trl_defaults() -> dict[str, object]:
    """TRL's default of each of its loss fields (GRPOConfig's dataclass defaults)."""
    return {f.name: f.default for f in fields(GRPOConfig) if f.name in TRL_LOSS_FIELDS}


def loss_from_trl(loss_type: str, values: dict[str, object]) -> tuple[str, str, dict, tuple[str, ...]]:
    """(objective, aggregation, hparams, TRL fields read) that compute TRL's ``loss_type`` from TRL's
    loss-field ``values``, exactly as GRPOTrainer reads them; ValueError where no mhpo objective does.

        clip family (grpo, dr_grpo, dapo):  eps_low = epsilon, eps_high = epsilon_high or epsilon,
                                            dual_clip = delta (TRL's two-sided clip, needs delta > 1 + eps_high);
                                            importance_sampling_level="sequence": objective gspo
        cispo:  cap = epsilon_high or epsilon  (TRL's absolute cap)
        sapo:   tau_pos, tau_neg = sapo_temperature_pos, sapo_temperature_neg
    """
    if loss_type in NO_COUNTERPART:
        raise ValueError(f"MHPOConfig: loss_type={loss_type!r} has no mhpo counterpart: {NO_COUNTERPART[loss_type]}")
    if loss_type not in LOSS_TYPES:
        valid = ", ".join([*LOSS_TYPES, *NO_COUNTERPART])
        raise ValueError(f"MHPOConfig: unknown loss_type {loss_type!r}; TRL's loss types: {valid}")
    objective, agg = LOSS_TYPES[loss_type]
    eps_low = values["epsilon"]
    eps_high = values["epsilon"] if values["epsilon_high"] is None else values["epsilon_high"]
    sequence = values["importance_sampling_level"] == "sequence"
    if loss_type == "cispo":
        return objective, agg, {"cap": eps_high}, ("epsilon", "epsilon_high")
    if loss_type == "sapo":
        taus = {"tau_pos": values["sapo_temperature_pos"], "tau_neg": values["sapo_temperature_neg"]}
        return objective, agg, taus, ("sapo_temperature_pos", "sapo_temperature_neg")
    hp = {"eps_low": eps_low, "eps_high": eps_high}
    delta = values["delta"]
    if delta is not None:
        if sequence or not delta > 1 + eps_high:
            raise ValueError(
                f"MHPOConfig: delta={delta!r} equals a dual clip only for token-level ratios and delta > 1 + "
                f"epsilon_high = {1 + eps_high:g}; got importance_sampling_level="
                f"{values['importance_sampling_level']!r}"
            )
        hp["dual_clip"] = delta
    return ("gspo" if sequence else objective), agg, hp, _CLIP_FIELDS


def check_unread_trl_fields(values: dict[str, object], read: tuple[str, ...], via: str) -> None:
    """ValueError naming the first TRL loss field that is not at TRL's default although ``via`` (the
    objective or loss_type chosen) does not read it: a setting never to be dropped silently."""
    for name, default in trl_defaults().items():
        if name not in read and values[name] != default:
            raise ValueError(
                f"MHPOConfig: {name}={values[name]!r} is a TRL loss field that {via} does not read; "
                f"use {TRL_LOSS_FIELDS[name]}"
            )


@dataclass
class MHPOConfig(GRPOConfig):
    """GRPOConfig whose loss is an objective of :mod:`mhpo.objectives` (default: MHPO, paper defaults).

    Pick the loss one of two ways, not both:

    - ``objective`` (default MHPO) with ``loss_agg_mode`` (default token-mean), its hyper-parameters
      ``mhpo_c`` ... ``mhpo_lambda_neg`` (the MHPO family) and ``objective_hparams`` (any objective,
      e.g. ``{"eps_high": 0.28}`` for dapo). TRL's loss fields (``epsilon``, ``epsilon_high``,
      ``delta``, ``importance_sampling_level``, ``sapo_temperature_*``, ``vespo_*``) must then keep
      TRL's defaults: a changed one raises ValueError naming what to set instead.
    - ``loss_type`` (TRL's name): the mhpo objective and aggregation computing TRL's loss (LOSS_TYPES),
      with hparams from TRL's fields as GRPOTrainer reads them (:func:`loss_from_trl`);
      ``objective_hparams`` may add others (e.g. ``dual_clip``). bnpo, luspo and vespo raise.

    ``use_adaptive_entropy`` is rejected. ``use_bias_correction_kl`` defaults to False here (TRL: True)
    so that the KL term is policy_loss's ``beta * k3``.
    """

    _VALID_DICT_FIELDS = GRPOConfig._VALID_DICT_FIELDS + ["objective_hparams"]

    objective: str | None = field(
        default=None,
        metadata={
            "help": "Registered objective (see `mhpo objectives`): mhpo, grpo, dapo, gspo, sapo, ...; "
            "None: mhpo, or the objective of `loss_type` when that is set."
        },
    )
    loss_type: str | None = field(
        default=None,
        metadata={
            "help": f"TRL's loss name, mapped to the mhpo objective computing it: {', '.join(LOSS_TYPES)}. "
            "None (default here; TRL's default is 'dapo'): use `objective`."
        },
    )
    loss_agg_mode: str | None = field(
        default=None,
        metadata={
            "help": f"Loss aggregation, as in verl: {', '.join(AGG_MODES)}. None: token-mean, or that of `loss_type`."
        },
    )
    objective_hparams: dict | str | None = field(
        default=None,
        metadata={"help": "Hyper-parameters of the objective (dict or JSON string); defaults for the rest."},
    )
    use_bias_correction_kl: bool = field(
        default=False,
        metadata={
            "help": "TRL's DeepSeek-V3.2 correction, KL term times r (TRL's default: True). Off here so that the loss "
            "is exactly mhpo.policy_loss's (beta * k3); set True for TRL's unbiased reverse-KL gradient."
        },
    )
    mhpo_c: float | None = _mhpo_field("c")
    mhpo_k_pos: float | None = _mhpo_field("k_pos")
    mhpo_lambda_pos: float | None = _mhpo_field("lambda_pos")
    mhpo_k_neg: float | None = _mhpo_field("k_neg")
    mhpo_lambda_neg: float | None = _mhpo_field("lambda_neg")

    def __post_init__(self):
        super().__post_init__()
        self.resolved_loss()  # raises on a bad or conflicting setting
        if self.use_adaptive_entropy:
            raise ValueError(
                "MHPOConfig: use_adaptive_entropy=True is not supported by MHPOTrainer; use a static entropy_coef"
            )

    def resolved_loss(self) -> tuple[str, str, dict]:
        """(objective, loss_agg_mode, full hparam dict) of this config; ValueError on a bad or conflicting setting."""
        if self.loss_type is not None and self.objective is not None:
            raise ValueError(
                f"MHPOConfig: objective={self.objective!r} and loss_type={self.loss_type!r} are both set; set one "
                "(loss_type is TRL's name for a loss, objective mhpo's)"
            )
        trl_values = {name: getattr(self, name) for name in TRL_LOSS_FIELDS}
        if self.loss_type is None:
            objective, agg, from_trl, read = self.objective or "mhpo", "token-mean", {}, ()
            check_unread_trl_fields(trl_values, read, f"objective={objective!r}")
        else:
            objective, agg, from_trl, read = loss_from_trl(self.loss_type, trl_values)
            check_unread_trl_fields(trl_values, read, f"loss_type={self.loss_type!r}")
        if self.loss_agg_mode is not None:
            check_agg(self.loss_agg_mode)
            if self.loss_type is not None and self.loss_agg_mode != agg:
                raise ValueError(
                    f"MHPOConfig: loss_agg_mode={self.loss_agg_mode!r} contradicts loss_type={self.loss_type!r}, "
                    f"which aggregates with {agg!r}; drop one of them"
                )
            agg = self.loss_agg_mode
        named = {key: getattr(self, f"mhpo_{key}") for key in MHPO_FIELDS}
        where = f"MHPOConfig(objective={objective!r})"
        if self.loss_type is not None:
            where = f"MHPOConfig(loss_type={self.loss_type!r} -> objective {objective!r})"
        extra = merge_hparams(named, self.objective_hparams, where=where)
        clash = sorted(extra.keys() & from_trl.keys())
        if clash:
            raise ValueError(
                f"{where}: hparam {clash[0]!r} comes from TRL's fields with loss_type; set it there "
                f"({', '.join(read)}), not in objective_hparams"
            )
        return objective, agg, resolve_hparams(objective, {**from_trl, **extra}, where=where)

    def resolved_hparams(self) -> dict:
        """The objective's full hparam dict: defaults updated by TRL's fields (with loss_type), the mhpo_*
        fields and objective_hparams."""
        return self.resolved_loss()[2]


class MHPOTrainer(GRPOTrainer):
    """GRPOTrainer whose loss is ``args.objective`` from the mhpo registry; see the module docstring."""

    _tag_names = ["trl", "grpo", "mhpo"]
    _name = "MHPO"

    def __init__(self, model, reward_funcs=None, args: MHPOConfig | None = None, *rest, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = MHPOConfig(f"{str(name).split('/')[-1] or 'model'}-MHPO")
        if not isinstance(args, MHPOConfig):
            raise TypeError(f"MHPOTrainer needs args of type MHPOConfig, got {type(args).__name__}")
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        self.objective, self.loss_agg_mode, self.objective_hparams = args.resolved_loss()
        if args.gradient_accumulation_steps % (args.steps_per_generation * args.num_iterations) == 0:
            logger.warning(
                "MHPOTrainer: one update per generation batch, so TRL passes old log-probs = logp.detach() and "
                "r = 1 exactly: %s gets no ratio control. Set num_iterations >= 2 or steps_per_generation > "
                "gradient_accumulation_steps.",
                self.objective,
            )

    # -- generation: also count the non-empty sequences of the generation batch ------------------------

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mask = _loss_mask(out)
        # gathered like TRL's num_items_in_batch; a 0-dim tensor survives TRL's split/shuffle unchanged
        out["num_seqs_in_batch"] = self.accelerator.gather((mask.sum(-1) > 0).sum()).sum()
        return out

    # -- the loss ---------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        mask = _loss_mask(inputs)  # [B, T]
        logps, entropies, aux_loss = self._completion_logps(model, inputs)
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        adv = inputs["advantages"]
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
        ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None

        parts = token_losses(self.objective, logps, old, adv, mask, ref_logp=ref, stats=True, **self.objective_hparams)
        per_token = parts.policy
        scale = self._token_scale(inputs, logps, old, adv, mask, entropy_mask)
        if scale is not None:
            per_token = per_token * scale
        if self.beta != 0.0:
            kl = parts.kl * torch.exp(parts.log_r) if self.args.use_bias_correction_kl else parts.kl
            per_token = per_token + self.beta * kl
        weights = token_weights(
            parts.keep.to(per_token.dtype),
            self.loss_agg_mode,
            norm_length=self.max_completion_length,
            **self._global_counts(inputs, mode),
        )
        loss = (torch.where(parts.keep, per_token, torch.zeros_like(per_token)) * weights).sum()

        extra = self._regularisers(loss.detach(), entropies, mask, entropy_mask, aux_loss, mode)
        self._log_objective(mode, parts.stats, mask, entropies)
        return loss + extra

    def _completion_logps(self, model, inputs):
        """(logp [B, T], entropy [B, T], aux loss | None) of the completion tokens, as TRL computes them."""
        completion_ids = inputs["completion_ids"]
        return self._get_per_token_logps_and_entropies(
            model,
            torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{key: inputs.get(key) for key in _MODEL_INPUTS},
        )

    def _token_scale(self, inputs, logps, old, adv, mask, entropy_mask):
        """s_it, the product of TRL's per-token loss factors that are on ([B, T] or [B, 1]); None if none."""
        factors = []
        if self.off_policy_mask_threshold is not None:
            adv2d = adv.unsqueeze(1) if adv.dim() == 1 else adv
            sampling = inputs.get("sampling_per_token_logps", old)
            factors.append(self.get_off_policy_mask(adv2d, logps, sampling, mask, self.off_policy_mask_threshold))
        if entropy_mask is not None:
            factors.append(entropy_mask)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            factors.append(inputs["importance_sampling_ratio"])
        if not factors:
            return None
        scale = factors[0]
        for factor in factors[1:]:
            scale = scale * factor
        return scale

    def _global_counts(self, inputs, mode: str) -> dict[str, float]:
        """N_tok (and N_seq for the seq-mean modes) of the module docstring."""
        share = float(self.accelerator.num_processes)
        if mode == "train":
            share = share * self.args.steps_per_generation / self._window(mode)
        counts = {"num_tokens": max(float(inputs["num_items_in_batch"]), 1.0) / share}
        if self.loss_agg_mode != "token-mean":
            n_seq = inputs.get("num_seqs_in_batch")
            if n_seq is None:
                raise ValueError(
                    f"MHPOTrainer: loss_agg_mode={self.loss_agg_mode!r} needs inputs['num_seqs_in_batch'], which "
                    "MHPOTrainer._generate_and_score_completions adds; a subclass that overrides it must keep it"
                )
            counts["num_seqs"] = max(float(n_seq), 1.0) / share
        return counts

    def _window(self, mode: str) -> float:
        """G: the gradient-accumulation steps of the current window in training (set by the HF loop), 1 in eval."""
        if mode != "train":
            return 1.0
        return float(getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps))

    def _regularisers(self, policy_loss_value, entropies, mask, entropy_mask, aux_loss, mode: str):
        """TRL's static entropy bonus and MoE router aux loss, scaled for gradient accumulation like TRL."""
        window = self._window(mode)
        extra = torch.zeros((), device=entropies.device)
        if self.entropy_coef != 0.0:
            acted = mask if entropy_mask is None else mask * entropy_mask
            mean_entropy = (entropies * acted).sum() / acted.sum().clamp(min=1.0)
            extra = extra - self.entropy_coef * mean_entropy / window
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss_value).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        if self.aux_loss_enabled:
            extra = extra + self.router_aux_loss_coef * aux_loss / window
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        return extra

    # -- metrics ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def _log_objective(self, mode, stats, mask, entropies) -> None:
        """``policy_loss`` diagnostics (as ``objective/<key>``, KL as ``kl``) and TRL's ``entropy``.

        Means are token-weighted over processes; ratio min/p1 take the minimum, max/p99 the maximum.
        """
        keys = [key for key in stats if key not in ("loss", "tokens")]
        local = torch.tensor([stats["tokens"]] + [stats[k] for k in keys], dtype=torch.float64, device=mask.device)
        table = self.accelerator.gather(local).view(-1, len(keys) + 1)  # [P, 1 + K]
        tokens = table[:, 0]
        for j, key in enumerate(keys, start=1):
            self._metrics[mode]["kl" if key == "kl" else f"objective/{key}"].append(
                _reduce_stat(key, table[:, j], tokens)
            )
        totals = self.accelerator.reduce(torch.stack([(entropies * mask).sum(), mask.sum().float()]), reduction="sum")
        self._metrics[mode]["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())


def _loss_mask(batch) -> torch.Tensor:
    """TRL's loss mask: completion mask times the tool mask (0 on tool-result tokens) when present."""
    mask = batch["completion_mask"]
    return mask if "tool_mask" not in batch else mask * batch["tool_mask"]


def _reduce_stat(key: str, values: torch.Tensor, tokens: torch.Tensor) -> float:
    """One statistic over processes: min for ratio/min|p1, max for ratio/max|p99, else token-weighted mean.

    Processes without tokens (their stats are 0 placeholders) are left out.
    """
    if bool((tokens > 0).any()):
        values, tokens = values[tokens > 0], tokens[tokens > 0]
    if key in ("ratio/min", "ratio/p1"):
        return float(values.min())
    if key in ("ratio/max", "ratio/p99"):
        return float(values.max())
    return float((values * tokens).sum() / tokens.sum().clamp(min=1.0))
