"""Rollout groups -> padded tensors aligned for next-token log-probabilities.

Row i is prompt + completion i. Logits at position t score token t + 1, so every
per-token field of a completion is written at position (prompt length - 1 + j): the
arrays are [N, L - 1], aligned with `gather_logprobs(logits[:, :-1], input_ids[:, 1:])`.

`PackedGroups` is another way to run the same forward pass: one row per group holding its
prompt once and then every completion, with an attention mask and position ids that make
each completion see the prompt and itself only. Its log-probs are scattered back into the
[N, L - 1] layout, so losses never know which way they were computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

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
    packed: PackedGroups | None = None
    """The same tokens one row per group, when the learner computes prompts once."""

    def to(self, device: torch.device) -> TrainBatch:
        """The batch with every tensor on `device` (batches are built on the CPU)."""
        return _moved(self, device)


@dataclass(frozen=True)
class PackedGroups:
    """Groups packed one per row: [prompt, completion 1, ..., completion K], padded to W.

    The logits at `sources` score `targets`; the scores belong at (`rows`, `columns`) of
    the batch's [N, L-1] arrays. A completion's first token is scored by the logits of the
    prompt's last token, which every completion of the group shares.
    """

    input_ids: torch.Tensor
    """[G, W] long."""
    position_ids: torch.Tensor
    """[G, W] long: a completion's tokens continue the prompt's positions."""
    attention_mask: torch.Tensor
    """[G, 1, W, W] bool: causal within the prompt and within each completion, and every
    completion sees the whole prompt; padding sees only padding."""
    sources: torch.Tensor
    """[T] long: flat index into the [G * W] logits of the position that predicts a token."""
    targets: torch.Tensor
    """[T] long: the completion tokens scored."""
    rows: torch.Tensor
    """[T] long: completion row of each scored token in the batch."""
    columns: torch.Tensor
    """[T] long: its column in the batch's [N, L-1] arrays."""


def _moved(batch: object, device: torch.device) -> object:
    """A frozen dataclass of tensors (and nested ones) with every tensor on `device`."""
    changes = {}
    for field in fields(batch):
        value = getattr(batch, field.name)
        if isinstance(value, torch.Tensor):
            changes[field.name] = value.to(device, non_blocking=True)
        elif isinstance(value, PackedGroups):
            changes[field.name] = _moved(value, device)
    return replace(batch, **changes)


def padding_id(tokenizer: object) -> int:
    """The token that pads rows: the tokenizer's pad token, else its end-of-sequence token
    (many instruct models ship none; padding is masked out, so any id would do)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


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
    pack: bool = False,
) -> TrainBatch:
    """Flatten groups into rows; advantages are computed within each group. `pack` adds
    the one-row-per-group layout (`PackedGroups`)."""
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
    packed = pack_groups(groups, pad_id) if pack else None
    return TrainBatch(
        input_ids, attention_mask, behaviour, advantages, loss_mask, staleness, packed=packed
    )


def pack_groups(groups: Sequence[RolloutGroup], pad_id: int) -> PackedGroups:
    """One row per group: the prompt once, then each completion (see `PackedGroups`)."""
    rows_ids, rows_positions, rows_segments = [], [], []
    sources, targets, rows, columns = [], [], [], []
    row = 0
    for group in groups:
        prompt = np.asarray(group.prompt_token_ids, np.int64)
        ids, positions = [prompt], [np.arange(len(prompt))]
        segments = [np.full(len(prompt), -1)]  # -1: prompt, k: completion k, -2: padding
        start = len(prompt)
        for k, completion in enumerate(group.completions):
            tokens = np.asarray(completion.token_ids, np.int64)
            n = len(tokens)
            ids.append(tokens)
            positions.append(len(prompt) + np.arange(n))
            segments.append(np.full(n, k))
            if n:
                # Token j is predicted at the token before it: the prompt's last for j = 0.
                predicted_at = np.concatenate([[len(prompt) - 1], start + np.arange(n - 1)])
                sources.append((len(rows_ids), predicted_at))
                targets.append(tokens)
                rows.append(np.full(n, row))
                columns.append(len(prompt) - 1 + np.arange(n))
            start += n
            row += 1
        rows_ids.append(np.concatenate(ids))
        rows_positions.append(np.concatenate(positions))
        rows_segments.append(np.concatenate(segments))
    width = max(len(r) for r in rows_ids)
    input_ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(groups), width), dtype=torch.long)
    segment = torch.full((len(groups), width), -2, dtype=torch.long)
    for g, (ids, positions, segments) in enumerate(
        zip(rows_ids, rows_positions, rows_segments, strict=True)
    ):
        input_ids[g, : len(ids)] = torch.from_numpy(ids)
        position_ids[g, : len(ids)] = torch.from_numpy(positions)
        segment[g, : len(ids)] = torch.from_numpy(segments)
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    sees_prompt = (key == -1) & (query != -2)
    attention_mask = (causal & (sees_prompt | (key == query)))[:, None]
    flat_sources = np.concatenate([g * width + at for g, at in sources])
    return PackedGroups(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        sources=torch.from_numpy(flat_sources),
        targets=torch.from_numpy(np.concatenate(targets)),
        rows=torch.from_numpy(np.concatenate(rows)),
        columns=torch.from_numpy(np.concatenate(columns)),
    )


def _group_advantages(
    group: RolloutGroup, advantage: Callable[[torch.Tensor], torch.Tensor]
) -> list[float]:
    rewards = torch.tensor(group.rewards, dtype=torch.float32)[None, :]
    return advantage(rewards)[0].tolist()
