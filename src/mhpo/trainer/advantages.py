"""Group-relative advantages: one scalar per completion, from the rewards of its group.

    grpo     A_i = (R_i - mean_G R) / (std_G R + eps)      std with Bessel's correction (as TRL)
    dr_grpo  A_i =  R_i - mean_G R                         (Dr. GRPO: no std normalisation)

A group whose rewards are all equal has A = 0 for every member: it adds no gradient but still
counts in token-mean denominators. ``drop_zero_std`` removes such groups from the update instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def grpo(rewards: torch.Tensor, eps: float) -> torch.Tensor:  # [B, G] -> [B, G]
    """(R - mean) / (std + eps) within each group (row)."""
    return (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + eps)


def dr_grpo(rewards: torch.Tensor, eps: float) -> torch.Tensor:  # [B, G] -> [B, G]
    """R - mean within each group (row); ``eps`` unused."""
    return rewards - rewards.mean(-1, keepdim=True)


ESTIMATORS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {"grpo": grpo, "dr_grpo": dr_grpo}


def zero_std_groups(rewards: torch.Tensor) -> torch.Tensor:  # [B, G] -> [B] bool
    """Groups in which every completion got the same reward."""
    return (rewards == rewards[:, :1]).all(-1)


def group_advantages(
    rewards: torch.Tensor,  # [B * G] flat, groups contiguous
    group_size: int,
    estimator: str = "grpo",
    eps: float = 1e-4,
    drop_zero_std: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([B * G] advantages, [B * G] bool rows kept for the update)
    """Advantages per completion and the rows that enter the update."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    r = rewards.double().view(-1, group_size)  # [B, G]
    adv = ESTIMATORS[estimator](r, eps)
    keep = torch.ones_like(r, dtype=torch.bool)
    if drop_zero_std:
        keep &= ~zero_std_groups(r).unsqueeze(-1)
    return adv.reshape(-1).to(rewards.dtype), keep.reshape(-1)
