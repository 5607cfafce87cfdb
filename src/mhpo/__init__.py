"""mhpo: stable RL for language and vision-language models.

from mhpo import policy_loss, OBJECTIVES
loss, stats = policy_loss("mhpo", logp, old_logp, advantages, mask)
"""

from mhpo.objectives import OBJECTIVES, Objective, get_objective
from mhpo.objectives.aggregation import AGG_MODES, global_counts, token_weights
from mhpo.objectives.loss import TokenLosses, policy_loss, token_losses

__version__ = "0.1.0"
__all__ = [
    "policy_loss",
    "token_losses",
    "TokenLosses",
    "OBJECTIVES",
    "Objective",
    "get_objective",
    "AGG_MODES",
    "token_weights",
    "global_counts",
]
