"""Engine adapters: MHPO and every registered objective inside TRL and verl.

    from mhpo.integrations.trl import MHPOConfig, MHPOTrainer        # TRL 1.16 (GRPOTrainer subclass)
    actor_rollout_ref.actor.policy_loss.loss_mode=mhpo                # verl 0.9.1 (plug-in, no fork)

Both adapters take the per-token loss from :func:`mhpo.token_losses` (the pieces that
:func:`mhpo.policy_loss` aggregates) and differ only in who aggregates it: TRL's adapter weights it
with :func:`mhpo.token_weights` (policy_loss's weights), verl's hands it to verl's own ``agg_loss``.
This module holds the hparam plumbing they share; no objective math.
"""

from __future__ import annotations

from collections.abc import Mapping

from mhpo.objectives import get_objective

__all__ = ["resolve_hparams", "merge_hparams", "MHPO_FIELDS"]

# MHPO hyper-parameters that have their own config field ``mhpo_<name>`` in both adapters.
MHPO_FIELDS = ("c", "k_pos", "lambda_pos", "k_neg", "lambda_neg")


def merge_hparams(named: Mapping[str, object], extra: Mapping[str, object] | None, *, where: str) -> dict:
    """``named`` (the ``mhpo_<key>`` fields, None = objective default) merged with a free-form dict.

    Raises ValueError when one key is given both ways, naming both spellings.
    """
    hp = {key: value for key, value in named.items() if value is not None}
    for key, value in (extra or {}).items():
        if key in hp:
            raise ValueError(
                f"{where}: hparam {key!r} is set twice, as mhpo_{key}={hp[key]!r} and in the hparams dict "
                f"({value!r}); set it once"
            )
        hp[key] = value
    return hp


def resolve_hparams(objective: str, hparams: Mapping[str, object], *, where: str) -> dict:
    """The objective's defaults updated by ``hparams``, validated (ValueError naming ``where``)."""
    try:
        return get_objective(objective).resolve(dict(hparams))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
