"""Advantage estimators against numbers computed by hand."""

from __future__ import annotations

import pytest
import torch

from learner.advantages import get_advantage, grpo, grpo_no_std, rloo, to_tokens

# One group of four completions: rewards 1, 0, 0, 1 -> mean 0.5.
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0]])


def test_grpo_by_hand() -> None:
    # centred: [0.5, -0.5, -0.5, 0.5]; unbiased std = sqrt((4 x 0.25) / 3) = 0.57735
    # -> A = ±0.5 / 0.57735 = ±0.866025
    expected = torch.tensor([[0.866025, -0.866025, -0.866025, 0.866025]])
    assert torch.allclose(grpo(REWARDS), expected, atol=1e-5)


def test_grpo_no_std_by_hand() -> None:
    assert torch.allclose(grpo_no_std(REWARDS), torch.tensor([[0.5, -0.5, -0.5, 0.5]]))


def test_rloo_by_hand() -> None:
    # completion 0: 1 - mean(0, 0, 1) = 1 - 1/3 = 0.666667
    # completion 1: 0 - mean(1, 0, 1) = -0.666667
    # (equivalently K / (K - 1) x centred = 4/3 x ±0.5)
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]])
    assert torch.allclose(rloo(REWARDS), expected, atol=1e-6)


def test_equal_rewards_carry_no_signal() -> None:
    same = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    for estimator in (grpo, grpo_no_std, rloo):
        assert torch.equal(estimator(same), torch.zeros_like(same))


def test_groups_are_independent() -> None:
    # Group 2 is group 1 shifted by 10: group-relative advantages are the same.
    rewards = torch.stack([REWARDS[0], REWARDS[0] + 10])
    for estimator in (grpo, grpo_no_std, rloo):
        out = estimator(rewards)
        assert torch.allclose(out[0], out[1], atol=1e-5)


def test_single_completion_groups_get_zero() -> None:
    assert torch.equal(grpo(torch.tensor([[3.0]])), torch.zeros(1, 1))
    assert torch.equal(rloo(torch.tensor([[3.0]])), torch.zeros(1, 1))


def test_to_tokens_masks_environment_tokens() -> None:
    advantages = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[True, False, True], [True, True, False]])
    assert torch.equal(
        to_tokens(advantages, mask), torch.tensor([[2.0, 0.0, 2.0], [-1.0, -1.0, 0.0]])
    )


def test_unknown_estimator_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid: grpo, grpo_no_std, rloo"):
        get_advantage("ppo")
