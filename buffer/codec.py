"""msgpack encoding of `RolloutGroup`: arrays as raw little-endian bytes, never pickle.

Everything read back from Redis goes through `decode_group`, which checks the schema
version, every field's type, every array's byte length and dtype, and then the contract
itself (`RolloutGroup.validate`). Anything wrong raises `MalformedRollout`, so the buffer
can quarantine the entry instead of crashing the learner.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from buffer.schema import SCHEMA_VERSION, FinishReason, GroupColumns, MalformedRollout, RolloutGroup

# Little-endian on the wire whatever the host is, so actors and learners on different
# machines agree byte for byte. Completions travel as columns: one array per field for
# the whole group, plus per-completion lengths (see GroupColumns).
_ARRAYS = {
    name: (np.dtype(wire), np.dtype(host))
    for name, wire, host in [
        ("prompt_token_ids", "<i4", np.int32),
        ("completion_lengths", "<i4", np.int32),
        ("token_ids", "<i4", np.int32),
        ("behaviour_logprobs", "<f4", np.float32),
        ("loss_mask", "u1", np.bool_),
        ("version_values", "<i8", np.int64),
        ("version_lengths", "<i4", np.int32),
        ("runs_per_completion", "<i4", np.int32),
        ("rewards", "<f8", np.float64),
        ("generation_s", "<f8", np.float64),
    ]
}
_STRINGS = ("run_id", "group_id", "env_name", "prompt_id", "actor_id")
_MAX_ENCODED_BYTES = 256 * 1024 * 1024


def encode_group(group: RolloutGroup) -> bytes:
    """Validate `group` and encode it; raises `MalformedRollout` before anything is written."""
    columns = group.columns()
    columns.validate()
    payload: dict[str, Any] = {"schema": SCHEMA_VERSION}
    payload.update({name: getattr(group, name) for name in _STRINGS})
    payload["created_at"] = float(group.created_at)
    for name, (wire, _) in _ARRAYS.items():
        payload[name] = np.ascontiguousarray(getattr(columns, name), dtype=wire).tobytes()
    payload["finish_reasons"] = [reason.value for reason in columns.finish_reasons]
    payload["verifier_details"] = [dict(details) for details in columns.verifier_details]
    return msgpack.packb(payload, use_bin_type=True)


def decode_group(raw: bytes) -> RolloutGroup:
    """Decode and validate bytes from the buffer; raises `MalformedRollout` on any defect."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise MalformedRollout(f"expected bytes, got {type(raw).__name__}")
    if len(raw) > _MAX_ENCODED_BYTES:
        raise MalformedRollout(f"encoded group is {len(raw)} bytes, over the limit")
    try:
        payload = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, use_list=True, ext_hook=_reject_ext
        )
    except MalformedRollout:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        # msgpack signals truncation, extra data and bad UTF-8 with these.
        raise MalformedRollout(f"not a msgpack rollout: {error}") from None
    if not isinstance(payload, dict):
        raise MalformedRollout(f"group is a {type(payload).__name__}, expected a map")
    fields = _Fields(payload)
    schema = fields.get("schema", int)
    if schema != SCHEMA_VERSION:
        raise MalformedRollout(f"schema version {schema}, this decoder reads {SCHEMA_VERSION}")
    strings = {name: fields.get(name, str) for name in _STRINGS}
    created_at = fields.get("created_at", float)
    arrays = {name: _from_wire(fields.get(name, bytes), name) for name in _ARRAYS}
    columns = GroupColumns(
        **arrays,
        finish_reasons=_finish_reasons(fields.get("finish_reasons", list)),
        verifier_details=_verifier_details(fields.get("verifier_details", list)),
    )
    fields.expect_no_more()
    columns.validate()
    group = RolloutGroup(
        **strings,
        prompt_token_ids=columns.prompt_token_ids,
        completions=columns.completions(),
        created_at=created_at,
    )
    group.validate_header()
    return group


def _from_wire(raw: bytes, name: str) -> np.ndarray:
    wire, host = _ARRAYS[name]
    if len(raw) % wire.itemsize:
        raise MalformedRollout(f"{name} has {len(raw)} bytes, not a multiple of {wire.itemsize}")
    array = np.frombuffer(raw, dtype=wire)
    if name == "loss_mask":
        if array.size and array.max() > 1:
            raise MalformedRollout("loss_mask holds a value other than 0 or 1")
        return array.view(np.bool_)
    # On little-endian hosts this is the same dtype: a read-only view, no copy.
    return array if wire == host else array.astype(host)


def _finish_reasons(values: list) -> list[FinishReason]:
    try:
        return [FinishReason(value) for value in values]
    except (ValueError, TypeError):
        raise MalformedRollout(f"finish_reasons {values!r} holds an unknown reason") from None


def _verifier_details(values: list) -> list[dict]:
    for i, details in enumerate(values):
        if not isinstance(details, dict):
            raise MalformedRollout(f"completions[{i}].verifier_details is not a map")
        for key, value in details.items():
            if not isinstance(key, str) or not isinstance(
                value, (str, int, float, bool, type(None))
            ):
                raise MalformedRollout(
                    f"completions[{i}].verifier_details[{key!r}] is not a scalar"
                )
    return values


def _reject_ext(code: int, data: bytes) -> None:
    raise MalformedRollout(f"msgpack extension type {code} is not part of the rollout schema")


class _Fields:
    """Typed access to the decoded msgpack map that names the offending field in errors."""

    def __init__(self, payload: dict) -> None:
        self.payload = payload
        self.seen: set[str] = set()

    def get(self, key: str, kind: type) -> Any:
        if key not in self.payload:
            raise MalformedRollout(f"{key} is missing")
        value = self.payload[key]
        self.seen.add(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise MalformedRollout(f"{key} is a {type(value).__name__}, expected {kind.__name__}")
        return value

    def expect_no_more(self) -> None:
        extra = set(self.payload) - self.seen
        if extra:
            raise MalformedRollout(f"unknown fields {sorted(extra)}")
