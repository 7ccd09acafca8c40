"""Rollout groups -> padded tensors aligned for next-token log-probabilities.

Row i is prompt + completion i. Logits at position t score token t + 1, so every
per-token field of a completion is written at position (prompt length - 1 + j): the
arrays are [N, L - 1], aligned with `gather_logprobs(logits[:, :-1], input_ids[:, 1:])`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from buffer.schema import RolloutGroup


@dataclass(frozen=True)
class TrainBatch:
    """One learner batch, padded on the right."""

    input_ids: torch.Tensor
    """[N, L] long: prompt then completion tokens."""
    attention_mask: torch.Tensor
    """[N, L] long."""
    behaviour_logprobs: torch.Tensor
    """[N, L-1] float32: log μ of each completion token at its predicting position."""
    advantages: torch.Tensor
    """[N, L-1] float32: the completion's advantage on its loss tokens, 0 elsewhere."""
    loss_mask: torch.Tensor
    """[N, L-1] bool: sampled completion tokens (not prompt, padding or environment tokens)."""
    staleness: torch.Tensor
    """[N] long: learner version minus the completion's oldest token version."""
    proximal_logprobs: torch.Tensor | None = None
    """[N, L-1] float32: log π_prox, frozen before a batch's first update (when it has
    several); None when the one update's own policy is π_prox."""


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-padded to the longest: input ids [N, L] and attention mask [N, L]."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


def build_batch(
    groups: Sequence[RolloutGroup],
    advantage: Callable[[torch.Tensor], torch.Tensor],
    pad_id: int,
    learner_version: int,
) -> TrainBatch:
    """Flatten groups into rows; advantages are computed within each group."""
    rows = [
        (g, c, adv)
        for g in groups
        for c, adv in zip(g.completions, _group_advantages(g, advantage), strict=True)
    ]
    input_ids, attention_mask = pad_right(
        [np.concatenate([g.prompt_token_ids, c.token_ids]) for g, c, _ in rows], pad_id
    )
    n, width = input_ids.shape
    behaviour = torch.zeros((n, width - 1), dtype=torch.float32)
    advantages = torch.zeros((n, width - 1), dtype=torch.float32)
    loss_mask = torch.zeros((n, width - 1), dtype=torch.bool)
    staleness = torch.zeros(n, dtype=torch.long)
    for i, (group, completion, adv) in enumerate(rows):
        prompt_len, length = len(group.prompt_token_ids), completion.n_tokens
        span = slice(prompt_len - 1, prompt_len - 1 + length)
        mask = torch.from_numpy(np.array(completion.loss_mask))
        loss_mask[i, span] = mask
        behaviour[i, span] = torch.from_numpy(np.array(completion.behaviour_logprobs))
        advantages[i, span] = adv * mask.float()
        staleness[i] = learner_version - completion.policy_versions.min_version
    return TrainBatch(input_ids, attention_mask, behaviour, advantages, loss_mask, staleness)


def _group_advantages(
    group: RolloutGroup, advantage: Callable[[torch.Tensor], torch.Tensor]
) -> list[float]:
    rewards = torch.tensor(group.rewards, dtype=torch.float32)[None, :]
    return advantage(rewards)[0].tolist()
