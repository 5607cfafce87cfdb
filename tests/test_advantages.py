"""Group advantages: the GRPO and Dr. GRPO formulas and the zero-variance filter."""

from __future__ import annotations

import pytest
import torch

from mhpo.trainer.advantages import group_advantages


def test_grpo_is_std_normalised_and_dr_grpo_mean_centred():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0])  # two groups of 4
    adv, keep = group_advantages(r, 4, "grpo", eps=1e-4)
    g = r.view(2, 4)
    expected = (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)
    assert torch.allclose(adv, expected.view(-1), atol=1e-6)
    assert keep.all()
    dr, _ = group_advantages(r, 4, "dr_grpo")
    assert torch.allclose(dr, (g - g.mean(1, keepdim=True)).view(-1))
    assert torch.allclose(adv.view(2, 4).sum(1), torch.zeros(2), atol=1e-5)  # centred per group


def test_zero_std_groups_get_zero_advantage_and_can_be_dropped():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])  # groups of 2: equal, equal?, no
    adv, keep = group_advantages(r, 2, "grpo")
    assert adv[:2].abs().max() == 0
    assert keep.all()
    _, keep = group_advantages(r, 2, "grpo", drop_zero_std=True)
    assert keep.tolist() == [False, False, True, True, True, True]


def test_unknown_estimator():
    with pytest.raises(ValueError, match="valid: grpo, dr_grpo"):
        group_advantages(torch.zeros(4), 2, "ppo")
