"""Advantage estimators: small pure functions of rewards (no critic).

Rewards arrive as one row per group: `rewards[g, k]` is the reward of completion k of
prompt g. Every estimator returns a tensor of the same shape [G, K].
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Estimator = Callable[[torch.Tensor], torch.Tensor]


def grpo(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantage with std normalisation (GRPO; Shao et al. 2024, DeepSeekMath).

    A[g, k] = (r[g, k] - mean_k r[g]) / (std_k r[g] + eps), std with Bessel's correction
    as in verl. A group whose rewards are all equal carries no signal: A = 0.
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards)
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def grpo_no_std(rewards: torch.Tensor) -> torch.Tensor:
    """Group-relative advantage without std normalisation (Dr. GRPO; Liu et al. 2025).

    A[g, k] = r[g, k] - mean_k r[g]: avoids up-weighting groups that are almost all
    right or all wrong, whose std is small.
    """
    return rewards - rewards.mean(dim=1, keepdim=True)


def rloo(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024).

    A[g, k] = r[g, k] - mean_{j != k} r[g, j] = K / (K - 1) * (r[g, k] - mean_k r[g]).
    """
    size = rewards.shape[1]
    if size < 2:
        return torch.zeros_like(rewards)
    return size / (size - 1) * (rewards - rewards.mean(dim=1, keepdim=True))


ADVANTAGES: dict[str, Estimator] = {"grpo": grpo, "grpo_no_std": grpo_no_std, "rloo": rloo}


def get_advantage(name: str) -> Estimator:
    """The estimator called `name`; an unknown name fails listing the valid ones."""
    if name not in ADVANTAGES:
        raise ValueError(
            f"unknown advantage estimator {name!r}; valid: {', '.join(sorted(ADVANTAGES))}"
        )
    return ADVANTAGES[name]


def to_tokens(advantages: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Broadcast one advantage per sequence to its tokens, zero where the loss mask is off.

    advantages: [B]; loss_mask: [B, T] bool -> [B, T]. In a multi-turn episode the
    environment's tokens carry no advantage: they were not the policy's choice.
    """
    return advantages[:, None] * loss_mask.to(advantages.dtype)
