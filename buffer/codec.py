"""The wire format of `RolloutGroup`: a msgpack header, then the arrays' raw bytes.

    [u32 little-endian: header length][msgpack map: ids, scalars, per-array byte counts]
    [the arrays' little-endian bytes, back to back]

Arrays are never inside the msgpack, so decoding views them where they lie in the bytes
Redis returned (no copy), and nothing is ever unpickled. Everything read back from Redis
goes through `decode_groups`, which checks the framing, the schema version, every
field's type, every array's byte length and dtype, and then the contract itself
(`check_columns`, for the whole batch at once). Anything wrong comes back as
`MalformedRollout` for that entry, so the buffer can quarantine it instead of crashing
the learner.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgpack
import numpy as np

from buffer.schema import (
    NUMERIC_COLUMNS,
    SCHEMA_VERSION,
    BatchColumns,
    ColumnCompletions,
    FinishReason,
    GroupColumns,
    MalformedRollout,
    RolloutGroup,
    chunk_slices,
    gather_columns,
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
_STRINGS = ("run_id", "group_id", "env_name", "prompt_id", "actor_id")
_FIELDS = ("schema", *_STRINGS, "created_at", *_ARRAYS, "finish_reasons", "verifier_details")
_FIELD_SET = frozenset(_FIELDS)
_ARRAY_NAMES = list(_ARRAYS)
_REASONS = {reason.value: reason for reason in FinishReason}
_SCALARS = frozenset({str, int, float, bool, type(None)})
_MAX_ENCODED_BYTES = 256 * 1024 * 1024
_HEADER_LENGTH = struct.Struct("<I")


class EncodedGroup(NamedTuple):
    """A group's bytes and what the buffer indexes it by."""

    payload: bytes
    min_version: int
    max_version: int
    n_tokens: int


def encode_groups(groups: Sequence[RolloutGroup]) -> list[EncodedGroup]:
    """Validate `groups` (all at once) and encode them; raises `MalformedRollout` naming
    the first invalid group before anything is written."""
    try:
        batch = gather_columns(groups)
    except MalformedRollout:
        for group in groups:  # which group, to say so
            try:
                group.columns()
            except MalformedRollout as error:
                raise MalformedRollout(f"group {group.group_id!r}: {error}") from None
        raise
    for group, error in zip(groups, batch.errors(), strict=True):
        if error is not None:
            raise MalformedRollout(f"group {group.group_id!r}: {error}")
    encoded = []
    for i, group in enumerate(groups):
        columns = batch.group(i)
        versions = columns.version_values
        encoded.append(
            EncodedGroup(
                _pack(group, columns),
                int(versions.min()),
                int(versions.max()),
                int(columns.token_ids.size),
            )
        )
    return encoded


def encode_group(group: RolloutGroup) -> bytes:
    """Validate `group` and encode it; raises `MalformedRollout` before anything is written."""
    return encode_groups([group])[0].payload


def _pack(group: RolloutGroup, columns: GroupColumns) -> bytes:
    fields: dict[str, Any] = {"schema": SCHEMA_VERSION}
    fields.update({name: getattr(group, name) for name in _STRINGS})
    fields["created_at"] = float(group.created_at)
    # FinishReason is a str enum: msgpack writes its value.
    fields["finish_reasons"] = columns.finish_reasons
    fields["verifier_details"] = columns.verifier_details
    for name, (wire, host) in _ARRAYS.items():
        array = getattr(columns, name)
        if host == np.bool_:
            array = array.view(np.uint8)
        # Columns are fresh, contiguous host arrays: no copy unless the host is big-endian.
        fields[name] = array if array.dtype == wire else np.ascontiguousarray(array, wire)
    return write_fields(fields)


def write_fields(fields: dict[str, Any]) -> bytes:
    """Frame a group's fields: bytes-like array fields go after the header, the rest in it.

    The inverse of `read_fields`; `encode_group` is the way to encode a group. Tests use
    the pair to corrupt one field of an encoded group.
    """
    header, arrays = {}, {}
    for name, value in fields.items():
        if name in _ARRAYS and isinstance(value, (bytes, bytearray, memoryview, np.ndarray)):
            arrays[name] = memoryview(value).cast("B")
        else:
            header[name] = value
    header["arrays"] = {name: view.nbytes for name, view in arrays.items()}
    packed = msgpack.packb(header, use_bin_type=True)
    # One copy of every array, straight into the result.
    return b"".join([_HEADER_LENGTH.pack(len(packed)), packed, *arrays.values()])


def read_fields(raw: object) -> dict[str, Any]:
    """A group's fields as framed by `write_fields`: arrays are memoryviews into `raw`.

    Checks the framing only (lengths add up, the header is a msgpack map without
    extension types); `decode_groups` checks the fields.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise MalformedRollout(f"expected bytes, got {type(raw).__name__}")
    view = memoryview(raw).cast("B")
    if view.nbytes > _MAX_ENCODED_BYTES:
        raise MalformedRollout(f"encoded group is {view.nbytes} bytes, over the limit")
    if view.nbytes < _HEADER_LENGTH.size:
        raise MalformedRollout(f"{view.nbytes} bytes: too short for a rollout header")
    (header_length,) = _HEADER_LENGTH.unpack_from(view)
    offset = _HEADER_LENGTH.size + header_length
    if offset > view.nbytes:
        raise MalformedRollout(f"header of {header_length} bytes runs past the payload")
    try:
        header = msgpack.unpackb(
            view[_HEADER_LENGTH.size : offset],
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
    if type(header) is not dict:
        raise MalformedRollout(f"header is a {type(header).__name__}, expected a map")
    sizes = header.pop("arrays", None)
    if type(sizes) is not dict:
        raise MalformedRollout(f"arrays is a {_kind(sizes)}, expected a map of byte counts")
    for name, size in sizes.items():
        if type(size) is not int or size < 0 or name in header:
            raise MalformedRollout(f"arrays[{name!r}] is not a byte count of a new field")
        header[name] = view[offset : offset + size]
        offset += size
    if offset != view.nbytes:
        raise MalformedRollout(f"arrays need {offset} bytes, the payload has {view.nbytes}")
    return header


def decode_groups(raws: Sequence[object]) -> list[RolloutGroup | MalformedRollout]:
    """Decode and validate bytes from the buffer: per entry, the group or what is wrong.

    Small groups' arrays are joined into one array per column for a chunk of groups
    (`BatchColumns`) and validated with one pass of numpy calls; a big group's arrays
    are viewed where they lie in its bytes. Either way, a group's columns and completions
    are built only when someone reads them (`ColumnCompletions`).
    """
    results: list[RolloutGroup | MalformedRollout | None] = [None] * len(raws)
    entries: list[_Entry] = []
    for i, raw in enumerate(raws):
        try:
            entries.append(_parse(i, raw))
        except MalformedRollout as error:
            results[i] = error
    token_counts = [entry.arrays[_TOKEN_IDS].nbytes // 4 for entry in entries]
    for chunk in chunk_slices(token_counts):
        batch = _batch(entries[chunk])
        prompts, prompt_bounds = batch.arrays[0], batch.bounds[0]
        for k, (entry, error) in enumerate(zip(entries[chunk], batch.errors(), strict=True)):
            results[entry.index] = error or RolloutGroup(
                **entry.header,
                prompt_token_ids=prompts[prompt_bounds[k] : prompt_bounds[k + 1]],
                completions=ColumnCompletions(batch, k),
            )
    return results  # type: ignore[return-value]  # every entry was filled


class _Entry(NamedTuple):
    """One well-formed entry: its position, header fields and array bytes."""

    index: int
    header: dict[str, Any]
    finish_reasons: list[FinishReason]
    verifier_details: list[dict]
    arrays: list[memoryview]
    """In `NUMERIC_COLUMNS` order."""


def _batch(entries: Sequence[_Entry]) -> BatchColumns:
    """The entries' arrays, one per column: joined (one copy) or, alone, a view."""
    arrays, bounds = [], []
    for k, (view_dtype, host) in enumerate(_VIEWS):
        if len(entries) == 1:
            array = np.frombuffer(entries[0].arrays[k], dtype=view_dtype)
            bounds.append([0, array.size])
        else:
            pieces = [entry.arrays[k] for entry in entries]
            array = np.frombuffer(b"".join(pieces), dtype=view_dtype)
            size = view_dtype.itemsize
            counts = [piece.nbytes // size for piece in pieces]
            bounds.append(list(itertools.accumulate(counts, initial=0)))
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
    """One entry's fields, type-checked; its arrays as views of the bytes."""
    payload = read_fields(raw)
    if payload.keys() != _FIELD_SET:
        _explain_fields(payload)
    arrays = []
    for name, (view_dtype, _) in zip(_ARRAY_NAMES, _VIEWS, strict=True):
        value = payload[name]
        if type(value) is not memoryview:
            raise MalformedRollout(f"{name} is a {_kind(value)}, expected an array's bytes")
        if value.nbytes % view_dtype.itemsize:
            raise MalformedRollout(
                f"{name} has {value.nbytes} bytes, not a multiple of {view_dtype.itemsize}"
            )
        arrays.append(value)
    return _entry(index, payload, arrays)


def _entry(index: int, fields: dict[str, Any], arrays: list[memoryview]) -> _Entry:
    """Check an entry's header fields."""
    schema = fields["schema"]
    if type(schema) is not int or schema != SCHEMA_VERSION:
        raise MalformedRollout(f"schema version {schema!r}, this decoder reads {SCHEMA_VERSION}")
    header: dict[str, Any] = {}
    for name in _STRINGS:
        value = fields[name]
        if type(value) is not str or not value:
            raise MalformedRollout(f"{name} must be a non-empty string, got {_kind(value)}")
        header[name] = value
    created_at = fields["created_at"]
    if type(created_at) not in (float, int) or not math.isfinite(created_at):
        raise MalformedRollout(f"created_at is a {_kind(created_at)}, expected a finite float")
    header["created_at"] = float(created_at)
    return _Entry(
        index,
        header,
        _finish_reasons(fields["finish_reasons"]),
        _verifier_details(fields["verifier_details"]),
        arrays,
    )


def _explain_fields(payload: dict) -> None:
    for name in _FIELDS:
        if name not in payload:
            raise MalformedRollout(f"{name} is missing")
    raise MalformedRollout(f"unknown fields {sorted(map(str, payload.keys() - _FIELD_SET))}")


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
                    f"completions[{i}].verifier_details[{key!r}] is not a scalar"
                )
    return values


def _reject_ext(code: int, data: bytes) -> None:
    raise MalformedRollout(f"msgpack extension type {code} is not part of the rollout schema")
