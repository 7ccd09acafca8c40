"""The wire format of `RolloutGroup`: a fixed binary prefix, a msgpack header, the arrays.

    [u32 schema version][u32 header length][u32 byte count of each array, 10 of them]
    [msgpack array: run_id, group_id, env_name, prompt_id, actor_id, created_at,
                    finish_reasons, verifier_details]
    [the arrays' little-endian bytes, back to back, in `NUMERIC_COLUMNS` order]

All integers little-endian. Arrays are never inside the msgpack, so decoding views them
where they lie in the bytes Redis returned (no copy), and nothing is ever unpickled. The
header is positional and the byte counts are fixed-width, because decoding a sampled
batch is on the learner's hot path: a map of named fields cost twice as much to unpack
and check. Everything read back from Redis goes through `decode_groups`, which checks the
framing, the schema version, every header field's type, every array's byte length, and
then the contract itself (`check_columns`, for the whole batch at once). Anything wrong
comes back as `MalformedRollout` for that entry, so the buffer can quarantine it instead
of crashing the learner.
"""

from __future__ import annotations

import itertools
import math
import operator
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgpack
import numpy as np

from buffer.schema import (
    NUMERIC_COLUMNS,
    SCHEMA_VERSION,
    TOKEN_COLUMNS,
    BatchColumns,
    ColumnCompletions,
    FinishReason,
    GroupColumns,
    Limits,
    MalformedRollout,
    RolloutGroup,
    gather_columns,
    plan_batches,
)

# Little-endian on the wire whatever the host is, so actors and learners on different
# machines agree byte for byte. Completions travel as columns: one array per field for
# the whole group, plus per-completion lengths (see GroupColumns).
_WIRE_DTYPES = {
    "prompt_token_ids": ("<i4", np.int32),
    "completion_lengths": ("<i4", np.int32),
    "token_ids": ("<i4", np.int32),
    "behaviour_logprobs": ("<f4", np.float32),
    "loss_mask": ("u1", np.bool_),
    "version_values": ("<i8", np.int64),
    "version_lengths": ("<i4", np.int32),
    "runs_per_completion": ("<i4", np.int32),
    "rewards": ("<f8", np.float64),
    "generation_s": ("<f8", np.float64),
}
_ARRAYS = {  # wire and host dtypes, in the order of the columns (and of the wire format)
    name: (np.dtype(_WIRE_DTYPES[name][0]), np.dtype(_WIRE_DTYPES[name][1]))
    for name in NUMERIC_COLUMNS
}
# How each array is viewed in the bytes: on little-endian hosts as the host dtype itself,
# a read-only view with no copy (host None); big-endian hosts convert. The loss mask's
# bytes are viewed as bools; values other than 0 and 1 are caught by the contract check.
_VIEWS = [
    (host if wire.itemsize == 1 else wire, None if wire == host or wire.itemsize == 1 else host)
    for wire, host in _ARRAYS.values()
]
_TOKEN_IDS = NUMERIC_COLUMNS.index("token_ids")
_TOKEN_ID_BYTES = _ARRAYS["token_ids"][0].itemsize
_STRINGS = ("run_id", "group_id", "env_name", "prompt_id", "actor_id")
_HEADER = (*_STRINGS, "created_at", "finish_reasons", "verifier_details")
"""The msgpack header's fields, in order."""
_PREFIX = struct.Struct(f"<II{len(_ARRAYS)}I")
"""Schema version, header length, each array's byte count."""
_ITEM_MASKS = [wire.itemsize - 1 for wire, _ in _ARRAYS.values()]
"""Item sizes are powers of two: a byte count holds whole items when `count & mask` is 0."""
_REASONS = {reason.value: reason for reason in FinishReason}
_SCALARS = frozenset({str, int, float, bool, type(None)})
_MAX_ENCODED_BYTES = 256 * 1024 * 1024


class EncodedGroup(NamedTuple):
    """A group's bytes and what the buffer indexes it by."""

    payload: bytes
    min_version: int
    max_version: int
    n_tokens: int


def encode_groups(groups: Sequence[RolloutGroup]) -> list[EncodedGroup]:
    """Validate `groups` (all at once) and encode them; raises `MalformedRollout` naming
    the first invalid group before anything is written."""
    encoded = encode_each(groups)
    for result in encoded:
        if isinstance(result, MalformedRollout):
            raise result
    return encoded


def encode_each(
    groups: Sequence[RolloutGroup],
    vocab_size: int | None = None,
    max_sequence_tokens: int | None = None,
) -> list[EncodedGroup | MalformedRollout]:
    """Validate `groups` (all at once) and encode each; a group that is malformed, holds a
    token id outside `vocab_size` or a prompt + completion longer than
    `max_sequence_tokens` comes back as its `MalformedRollout`, naming it."""
    try:
        batch = gather_columns(groups)
    except MalformedRollout:
        if len(groups) > 1:  # which group: each on its own
            return [r for g in groups for r in encode_each([g], vocab_size, max_sequence_tokens)]
        try:
            groups[0].columns()
        except MalformedRollout as error:
            return [MalformedRollout(f"group {groups[0].group_id!r}: {error}")]
        raise
    results: list[EncodedGroup | MalformedRollout] = []
    errors = batch.errors()
    outside = _outside(batch, errors, Limits(vocab_size, max_sequence_tokens))
    for i, (group, error) in enumerate(zip(groups, errors, strict=True)):
        try:
            if error is not None:
                raise error
            if outside[i] is not None:
                raise MalformedRollout(outside[i])
            # What decoding would refuse (and msgpack may not even write, like numpy
            # scalars) fails here, in the actor, instead of being quarantined later.
            _verifier_details(batch.verifier_details[i])
            columns = batch.group(i)
        except MalformedRollout as failure:
            results.append(MalformedRollout(f"group {group.group_id!r}: {failure}"))
            continue
        versions = columns.version_values
        results.append(
            EncodedGroup(
                _pack(group, columns),
                int(versions.min()),
                int(versions.max()),
                int(columns.token_ids.size),
            )
        )
    return results


NO_LIMITS = Limits()


class OutOfLimits(MalformedRollout):
    """A well-formed group the learner cannot take (see `Limits`); names its producer."""

    def __init__(self, message: str, group_id: str, producer: str) -> None:
        super().__init__(f"group {group_id!r} from {producer!r}: {message}")
        self.group_id, self.producer = group_id, producer


def _outside(
    batch: BatchColumns, errors: Sequence[MalformedRollout | None], limits: Limits
) -> list[str | None]:
    """`batch.outside(limits)` for the groups without `errors` (None for the others)."""
    if limits == NO_LIMITS:
        return [None] * len(errors)
    if not any(errors):
        return batch.outside(limits)
    return [
        None if error else BatchColumns.of([batch.group(i)]).outside(limits)[0]
        for i, error in enumerate(errors)
    ]


def encode_group(group: RolloutGroup) -> bytes:
    """Validate `group` and encode it; raises `MalformedRollout` before anything is written."""
    return encode_groups([group])[0].payload


def _pack(group: RolloutGroup, columns: GroupColumns) -> bytes:
    header = [
        group.run_id,
        group.group_id,
        group.env_name,
        group.prompt_id,
        group.actor_id,
        float(group.created_at),
        columns.finish_reasons,  # FinishReason is a str enum: msgpack writes its value
        columns.verifier_details,
    ]
    arrays = []
    for name, (wire, host) in _ARRAYS.items():
        array = getattr(columns, name)
        if host == np.bool_:
            array = array.view(np.uint8)
        # Columns are fresh, contiguous host arrays: no copy unless the host is big-endian.
        arrays.append(array if array.dtype == wire else np.ascontiguousarray(array, wire))
    return _frame(SCHEMA_VERSION, header, arrays)


def _frame(schema: int, header: list, arrays: Sequence[object]) -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    views = [memoryview(array).cast("B") for array in arrays]  # type: ignore[arg-type]
    prefix = _PREFIX.pack(schema, len(packed), *(view.nbytes for view in views))
    # One copy of every array, straight into the result.
    return b"".join([prefix, packed, *views])


def write_fields(fields: dict[str, Any]) -> bytes:
    """Frame a group's fields, named as `read_fields` names them (arrays as bytes-likes).

    The inverse of `read_fields`; `encode_group` is the way to encode a group. Tests use
    the pair to corrupt one field of an encoded group.
    """
    return _frame(
        fields.get("schema", SCHEMA_VERSION),
        [fields[name] for name in _HEADER],
        [fields[name] for name in _ARRAYS],
    )


def read_fields(raw: object) -> dict[str, Any]:
    """A group's fields by name, as framed by `write_fields`: arrays are memoryviews into
    `raw`. Checks the framing only; `decode_groups` checks the fields."""
    header, offsets, view = _unframe(raw)
    fields = {"schema": SCHEMA_VERSION, **dict(zip(_HEADER, header, strict=True))}
    for name, start, end in zip(_ARRAYS, offsets, offsets[1:], strict=False):
        fields[name] = view[start:end]
    return fields


def _unframe(raw: object) -> tuple[list, list[int], memoryview]:
    """Check an entry's framing: the prefix, byte counts that add up to the payload and
    hold whole items, a header that is a msgpack array of the header's fields.

    Returns the header, where each array starts followed by the end, and a view of `raw`.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise MalformedRollout(f"expected bytes, got {type(raw).__name__}")
    view = memoryview(raw).cast("B")
    if view.nbytes > _MAX_ENCODED_BYTES:
        raise MalformedRollout(f"encoded group is {view.nbytes} bytes, over the limit")
    if view.nbytes < _PREFIX.size:
        raise MalformedRollout(f"{view.nbytes} bytes: too short for a rollout's prefix")
    schema, header_length, *sizes = _PREFIX.unpack_from(view)
    if schema != SCHEMA_VERSION:
        raise MalformedRollout(f"schema version {schema}, this decoder reads {SCHEMA_VERSION}")
    offsets = list(itertools.accumulate(sizes, initial=_PREFIX.size + header_length))
    if offsets[-1] != view.nbytes:
        raise MalformedRollout(
            f"header and arrays need {offsets[-1]} bytes, the payload has {view.nbytes}"
        )
    if any(map(operator.and_, sizes, _ITEM_MASKS)):
        for name, size, mask in zip(_ARRAYS, sizes, _ITEM_MASKS, strict=True):
            if size & mask:
                raise MalformedRollout(f"{name} has {size} bytes, not a multiple of {mask + 1}")
    try:
        header = msgpack.unpackb(
            view[_PREFIX.size : offsets[0]],
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_reject_ext,
        )
    except MalformedRollout:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        # msgpack signals truncation, extra data and bad UTF-8 with these.
        raise MalformedRollout(f"not a rollout header: {error}") from None
    if type(header) is not list or len(header) != len(_HEADER):
        found = f"{len(header)} fields" if type(header) is list else f"a {_kind(header)}"
        raise MalformedRollout(
            f"header holds {found}, expected a list of {len(_HEADER)}: {', '.join(_HEADER)}"
        )
    return header, offsets, view


def decode_groups(
    raws: Sequence[object], limits: Limits = NO_LIMITS
) -> list[RolloutGroup | MalformedRollout]:
    """Decode and validate bytes from the buffer: per entry, the group or what is wrong
    (an `OutOfLimits`, naming the producer, for a well-formed group outside `limits`).

    Small groups' arrays are joined into one array per column for a chunk of groups
    (`BatchColumns`) and validated with one pass of numpy calls. Big groups form a batch
    too, but their token columns are views of their bytes, checked group by group
    (`plan_batches`). Either way, a group's columns and completions are built only when
    someone reads them (`ColumnCompletions`).
    """
    results: list[RolloutGroup | MalformedRollout | None] = [None] * len(raws)
    entries: list[_Entry] = []
    for i, raw in enumerate(raws):
        try:
            entries.append(_parse(i, raw))
        except MalformedRollout as error:
            results[i] = error
    token_counts = [
        (entry.offsets[_TOKEN_IDS + 1] - entry.offsets[_TOKEN_IDS]) // _TOKEN_ID_BYTES
        for entry in entries
    ]
    for indices, join_tokens in plan_batches(token_counts):
        chunk = [entries[i] for i in indices]
        batch = _batch(chunk, join_tokens)
        prompts, prompt_bounds = batch.arrays[0], batch.bounds[0]
        errors = batch.errors()
        outside = _outside(batch, errors, limits)
        for k, (entry, error) in enumerate(zip(chunk, errors, strict=True)):
            if outside[k] is not None:
                error = OutOfLimits(outside[k], entry.strings[1], entry.strings[4])
            results[entry.index] = error or RolloutGroup(
                run_id=entry.strings[0],
                group_id=entry.strings[1],
                env_name=entry.strings[2],
                prompt_id=entry.strings[3],
                prompt_token_ids=prompts[prompt_bounds[k] : prompt_bounds[k + 1]],
                completions=ColumnCompletions(batch, k),
                actor_id=entry.strings[4],
                created_at=entry.created_at,
            )
    return results  # type: ignore[return-value]  # every entry was filled


class _Entry(NamedTuple):
    """One well-formed entry: its position, header fields and where its arrays lie."""

    index: int
    strings: list[str]
    """`_STRINGS`, in order."""
    created_at: float
    finish_reasons: list[FinishReason]
    verifier_details: list[dict]
    view: memoryview
    offsets: list[int]
    """Where each array (in `NUMERIC_COLUMNS` order) starts in `view`, then the end."""


def _batch(entries: Sequence[_Entry], join_tokens: bool) -> BatchColumns:
    """The entries' arrays, one per column, joined (one copy) or, alone, a view; with
    `join_tokens` False, the token columns are views of each entry's bytes instead."""
    arrays: list = []
    bounds = []
    for k, (view_dtype, host) in enumerate(_VIEWS):
        pieces = [entry.view[entry.offsets[k] : entry.offsets[k + 1]] for entry in entries]
        size = view_dtype.itemsize
        bounds.append(list(itertools.accumulate((p.nbytes // size for p in pieces), initial=0)))
        per_group = k in TOKEN_COLUMNS and not join_tokens
        if per_group or len(pieces) == 1:
            parts = [np.frombuffer(piece, dtype=view_dtype) for piece in pieces]
            if host is not None:
                parts = [part.astype(host) for part in parts]
            arrays.append(parts if per_group else parts[0])
        else:
            array = np.frombuffer(b"".join(pieces), dtype=view_dtype)
            arrays.append(array if host is None else array.astype(host))
    return BatchColumns(
        arrays,
        bounds,
        [entry.finish_reasons for entry in entries],
        [entry.verifier_details for entry in entries],
    )


def decode_group(raw: object) -> RolloutGroup:
    """Decode and validate bytes from the buffer; raises `MalformedRollout` on any defect."""
    (result,) = decode_groups([raw])
    if isinstance(result, MalformedRollout):
        raise result
    return result


def _parse(index: int, raw: object) -> _Entry:
    """One entry's framing and header fields, type-checked."""
    header, offsets, view = _unframe(raw)
    strings = header[:5]
    for name, value in zip(_STRINGS, strings, strict=True):
        if type(value) is not str or not value:
            raise MalformedRollout(f"{name} must be a non-empty string, got {_kind(value)}")
    created_at = header[5]
    if type(created_at) not in (float, int) or not math.isfinite(created_at):
        raise MalformedRollout(f"created_at is a {_kind(created_at)}, expected a finite float")
    return _Entry(
        index,
        strings,
        float(created_at),
        _finish_reasons(header[6]),
        _verifier_details(header[7]),
        view,
        offsets,
    )


def _kind(value: object) -> str:
    return "empty str" if value == "" else type(value).__name__


def _finish_reasons(values: object) -> list[FinishReason]:
    if type(values) is not list:
        raise MalformedRollout(f"finish_reasons is a {_kind(values)}, expected a list")
    try:
        return [_REASONS[value] for value in values]
    except (KeyError, TypeError):
        raise MalformedRollout(f"finish_reasons {values!r} holds an unknown reason") from None


def _verifier_details(values: object) -> list[dict]:
    if type(values) is not list:
        raise MalformedRollout(f"verifier_details is a {_kind(values)}, expected a list")
    # msgpack builds exact types, so checking `type(...)` is enough (and quickest).
    for i, details in enumerate(values):
        if type(details) is not dict:
            raise MalformedRollout(f"completions[{i}].verifier_details is not a map")
        for key, value in details.items():
            if type(key) is not str or type(value) not in _SCALARS:
                raise MalformedRollout(
                    f"completions[{i}].verifier_details[{key!r}] is a {type(value).__name__}, "
                    "not a str, int, float, bool or None (numpy scalars: use .item())"
                )
    return values


def _reject_ext(code: int, data: bytes) -> None:
    raise MalformedRollout(f"msgpack extension type {code} is not part of the rollout schema")
