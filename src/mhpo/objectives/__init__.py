"""The registered policy objectives. Importing this package registers all of them."""

# Registration order is the display order: MHPO and its ablations, then the baselines.
from mhpo.objectives import mhpo, ppo_clip, gspo, sapo, cispo, gmpo, reinforce  # noqa: F401,I001  (registration)
from mhpo.objectives.registry import (
    MAX_LOG_RATIO,
    OBJECTIVES,
    HParam,
    Objective,
    Terms,
    get_objective,
    objective,
    register,
)

__all__ = ["OBJECTIVES", "Objective", "HParam", "Terms", "get_objective", "objective", "register", "MAX_LOG_RATIO"]
