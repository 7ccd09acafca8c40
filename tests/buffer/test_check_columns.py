"""Whole-batch validation agrees with validating each group on its own (property tests).

`check_columns` checks many groups' columns concatenated, and only falls back to
`GroupColumns.validate` one group at a time when something is wrong. A corruption the
batch check missed would hand a malformed group to the learner, so every kind of value
corruption is tried at random positions in random batches.

Big groups' token columns are checked group by group instead of joined; the tests draw
the size at which a group counts as big, so that both ways (and batches mixing them) are
held to the same standard.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buffer import schema
from buffer.codec import decode_groups, encode_groups, read_fields, write_fields
from buffer.schema import (
    NUMERIC_COLUMNS,
    ColumnCompletions,
    GroupColumns,
    MalformedRollout,
    RolloutGroup,
    check_columns,
)
from tests.buffer.factories import versioned_group
from tests.buffer.strategies import rollout_groups


def _corrupt(columns: GroupColumns, kind: str, position: int) -> GroupColumns:
    """A copy of `columns` with one value broken; sizes stay consistent."""

    def at(array: np.ndarray) -> int:
        return position % array.size

    changes: dict[str, np.ndarray] = {}
    if kind == "negative_token":
        changes["token_ids"] = columns.token_ids.copy()
        changes["token_ids"][at(columns.token_ids)] = -1
    elif kind == "negative_prompt_token":
        changes["prompt_token_ids"] = columns.prompt_token_ids.copy()
        changes["prompt_token_ids"][at(columns.prompt_token_ids)] = -7
    elif kind == "mask_byte":
        mask = columns.loss_mask.view(np.uint8).copy()
        mask[at(mask)] = 2
        changes["loss_mask"] = mask.view(np.bool_)
    elif kind in ("nan_logprob", "positive_logprob", "inf_logprob"):
        logprobs, mask = columns.behaviour_logprobs.copy(), columns.loss_mask.copy()
        k = position % min(logprobs.size, mask.size)  # an earlier "extra_" may differ them
        mask[k] = True  # only sampled tokens are checked
        logprobs[k] = {"nan_logprob": np.nan, "positive_logprob": 0.5, "inf_logprob": -np.inf}[kind]
        changes.update(behaviour_logprobs=logprobs, loss_mask=mask)
    elif kind == "nan_env_logprob":  # off the mask: still refused
        logprobs, mask = columns.behaviour_logprobs.copy(), columns.loss_mask.copy()
        k = position % min(logprobs.size, mask.size)
        mask[k] = False
        logprobs[k] = np.nan
        changes.update(behaviour_logprobs=logprobs, loss_mask=mask)
    elif kind == "negative_version":
        changes["version_values"] = columns.version_values.copy()
        changes["version_values"][at(columns.version_values)] = -1
    elif kind == "run_too_long":
        changes["version_lengths"] = columns.version_lengths.copy()
        changes["version_lengths"][at(columns.version_lengths)] += 1
    elif kind == "empty_run":
        changes["version_lengths"] = columns.version_lengths.copy()
        changes["version_lengths"][at(columns.version_lengths)] = 0
    elif kind == "lengths_shifted":
        lengths = columns.completion_lengths.copy()
        lengths[at(lengths)] += 1
        changes["completion_lengths"] = lengths
    elif kind == "runs_shifted":
        runs = columns.runs_per_completion.copy()
        runs[at(runs)] += 1
        changes["runs_per_completion"] = runs
    elif kind in ("nan_reward", "inf_reward"):
        changes["rewards"] = columns.rewards.copy()
        changes["rewards"][at(columns.rewards)] = np.nan if kind == "nan_reward" else np.inf
    elif kind == "negative_generation_s":
        changes["generation_s"] = columns.generation_s.copy()
        changes["generation_s"][at(columns.generation_s)] = -1.0
    elif kind == "extra_finish_reason":
        return dataclasses.replace(
            columns, finish_reasons=[*columns.finish_reasons, columns.finish_reasons[0]]
        )
    elif kind.startswith("extra_"):  # one entry too many: the sizes disagree
        name = kind.removeprefix("extra_")
        array = getattr(columns, name)
        changes[name] = np.concatenate([array, array[:1]])
    return dataclasses.replace(columns, **changes)


_KINDS = [
    "negative_token", "negative_prompt_token", "mask_byte", "nan_logprob",
    "positive_logprob", "inf_logprob", "nan_env_logprob", "negative_version", "run_too_long",
    "empty_run",
    "lengths_shifted", "runs_shifted", "nan_reward", "inf_reward", "negative_generation_s",
    *(f"extra_{name}" for name in NUMERIC_COLUMNS), "extra_finish_reason",
]  # fmt: skip


_CORRUPTIONS = st.lists(
    st.tuples(st.integers(0, 4), st.sampled_from(_KINDS), st.integers(0, 10**6))
)
"""(group index, kind, position) triples; indices past the batch are ignored."""


def _corrupted(groups: list, corruptions: list[tuple[int, str, int]]) -> list[GroupColumns]:
    columns = [group.columns() for group in groups]
    for index, kind, position in corruptions:
        if index < len(columns):
            columns[index] = _corrupt(columns[index], kind, position)
    return columns


def _encoded_with(group: RolloutGroup, columns: GroupColumns) -> bytes:
    """`group` encoded, then its columns replaced by `columns` (bypassing validation)."""
    fields = read_fields(encode_groups([group])[0].payload)
    for name in NUMERIC_COLUMNS:
        array = getattr(columns, name)
        fields[name] = array.view(np.uint8) if array.dtype == np.bool_ else array
    fields["finish_reasons"] = [reason.value for reason in columns.finish_reasons]
    return write_fields(fields)


def _valid_alone(columns: GroupColumns) -> bool:
    try:
        columns.validate()
    except MalformedRollout:
        return False
    return True


_BIG = st.sampled_from([1, 8, 20, 16384])
"""Tokens from which a group's token columns are checked alone (16384 in production)."""


@settings(max_examples=300)
@given(
    st.lists(rollout_groups(), min_size=1, max_size=5),
    _CORRUPTIONS,
    _BIG,
)
def test_batch_check_finds_every_group_that_fails_alone(
    groups: list, corruptions: list[tuple[int, str, int]], big_tokens: int
) -> None:
    batch = _corrupted(groups, corruptions)
    with mock.patch.object(schema, "_BIG_TOKENS", big_tokens):
        errors = check_columns(batch)
    assert [error is None for error in errors] == [_valid_alone(c) for c in batch]
    for error, columns in zip(errors, batch, strict=True):
        if error is not None:  # the same message as checking the group alone
            try:
                columns.validate()
            except MalformedRollout as alone:
                assert str(alone) == str(error)


@given(st.lists(rollout_groups(), min_size=1, max_size=6), _BIG)
def test_a_batch_decodes_to_the_groups_with_lazy_completions(groups: list, big_tokens: int) -> None:
    with mock.patch.object(schema, "_BIG_TOKENS", big_tokens):
        decoded = decode_groups([encoded.payload for encoded in encode_groups(groups)])
    assert decoded == groups
    for group, original in zip(decoded, groups, strict=True):
        assert isinstance(group.completions, ColumnCompletions)
        assert (group.min_version, group.max_version) == (
            original.min_version,
            original.max_version,
        )
        assert group.rewards.tolist() == original.rewards.tolist()
        assert len(group.completions) == len(original.completions)


def test_one_bad_entry_in_a_batch_is_reported_alone() -> None:
    groups = [versioned_group(f"g{i}", version=i) for i in range(3)]
    payloads = [encoded.payload for encoded in encode_groups(groups)]
    payloads[1] = b"\x00garbage"
    decoded = decode_groups(payloads)
    assert isinstance(decoded[1], MalformedRollout)
    assert decoded[0] == groups[0] and decoded[2] == groups[2]


@settings(max_examples=200)
@given(
    st.lists(rollout_groups(), min_size=1, max_size=5),
    _CORRUPTIONS,
    _BIG,
)
def test_decoding_a_batch_flags_exactly_the_corrupted_entries(
    groups: list, corruptions: list[tuple[int, str, int]], big_tokens: int
) -> None:
    # The same corruptions, written into encoded entries: decoding joins the entries'
    # arrays into one batch, and must still attribute each defect to its entry.
    columns = _corrupted(groups, corruptions)
    payloads = [_encoded_with(g, c) for g, c in zip(groups, columns, strict=True)]
    with mock.patch.object(schema, "_BIG_TOKENS", big_tokens):
        decoded = decode_groups(payloads)
    for result, corrupted in zip(decoded, columns, strict=True):
        if _valid_alone(corrupted):
            assert isinstance(result, RolloutGroup)
            for name in NUMERIC_COLUMNS:  # byte for byte what was written
                decoded_bytes = getattr(result.columns(), name).tobytes()
                assert decoded_bytes == getattr(corrupted, name).tobytes(), name
        else:
            assert isinstance(result, MalformedRollout)


@pytest.mark.parametrize(
    "kind",
    [
        "negative_token",
        "mask_byte",
        "nan_logprob",
        "positive_logprob",
        "inf_logprob",
        "nan_env_logprob",
    ],
)
@pytest.mark.parametrize("target", [1, 3])
def test_big_groups_mixed_with_small_ones_keep_their_order_and_their_defects(
    kind: str, target: int
) -> None:
    # Real sizes: two groups over 16,384 tokens (token columns checked alone) between
    # small ones (joined); one big group has a defect in its token columns.
    def group(name: str, tokens: int) -> RolloutGroup:
        return versioned_group(name, version=1, tokens=tokens // 2)  # two completions

    groups = [group("s0", 8), group("b1", 20_000), group("s2", 8), group("b3", 17_000)]
    columns = [g.columns() for g in groups]
    columns[target] = _corrupt(columns[target], kind, 12_345)
    errors = check_columns(columns)
    assert [e is None for e in errors] == [i != target for i in range(4)]
    payloads = [encoded.payload for encoded in encode_groups(groups)]
    payloads[target] = _encoded_with(groups[target], columns[target])
    decoded = decode_groups(payloads)
    assert str(decoded[target]) == str(errors[target])
    assert [decoded[i] for i in range(4) if i != target] == [
        groups[i] for i in range(4) if i != target
    ]
    assert decoded[1 if target == 3 else 3].completions[0].token_ids.size in (10_000, 8_500)
