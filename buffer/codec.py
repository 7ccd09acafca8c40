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

from buffer.schema import (
    SCHEMA_VERSION,
    Completion,
    FinishReason,
    MalformedRollout,
    RolloutGroup,
    VersionRuns,
)

# Little-endian on the wire whatever the host is, so actors and learners on
# different machines agree byte for byte.
_WIRE_DTYPES = {
    "token_ids": np.dtype("<i4"),
    "behaviour_logprobs": np.dtype("<f4"),
    "loss_mask": np.dtype("u1"),
    "versions": np.dtype("<i8"),
    "lengths": np.dtype("<i4"),
}
_HOST_DTYPES = {
    "token_ids": np.int32,
    "behaviour_logprobs": np.float32,
    "loss_mask": np.bool_,
    "versions": np.int64,
    "lengths": np.int32,
}
_MAX_ENCODED_BYTES = 256 * 1024 * 1024


def encode_group(group: RolloutGroup) -> bytes:
    """Validate `group` and encode it; raises `MalformedRollout` before anything is written."""
    group.validate()
    payload = {
        "schema": SCHEMA_VERSION,
        "run_id": group.run_id,
        "group_id": group.group_id,
        "env_name": group.env_name,
        "prompt_id": group.prompt_id,
        "prompt_token_ids": _to_wire(group.prompt_token_ids, "token_ids"),
        "actor_id": group.actor_id,
        "created_at": float(group.created_at),
        "completions": [_encode_completion(c) for c in group.completions],
    }
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
    fields = _Fields(payload, "group")
    schema = fields.get("schema", int)
    if schema != SCHEMA_VERSION:
        raise MalformedRollout(f"schema version {schema}, this decoder reads {SCHEMA_VERSION}")
    group = RolloutGroup(
        run_id=fields.get("run_id", str),
        group_id=fields.get("group_id", str),
        env_name=fields.get("env_name", str),
        prompt_id=fields.get("prompt_id", str),
        prompt_token_ids=_from_wire(fields.get("prompt_token_ids", bytes), "token_ids", "prompt"),
        completions=[
            _decode_completion(_Fields(c, f"completions[{i}]"))
            for i, c in enumerate(fields.get("completions", list))
        ],
        actor_id=fields.get("actor_id", str),
        created_at=fields.get("created_at", float),
    )
    fields.expect_no_more()
    group.validate()
    return group


def _encode_completion(c: Completion) -> dict[str, Any]:
    return {
        "token_ids": _to_wire(c.token_ids, "token_ids"),
        "behaviour_logprobs": _to_wire(c.behaviour_logprobs, "behaviour_logprobs"),
        "loss_mask": _to_wire(c.loss_mask, "loss_mask"),
        "versions": _to_wire(c.policy_versions.versions, "versions"),
        "lengths": _to_wire(c.policy_versions.lengths, "lengths"),
        "reward": float(c.reward),
        "finish_reason": c.finish_reason.value,
        "verifier_details": dict(c.verifier_details),
        "generation_s": float(c.generation_s),
    }


def _decode_completion(fields: _Fields) -> Completion:
    where = fields.where
    finish = fields.get("finish_reason", str)
    try:
        finish_reason = FinishReason(finish)
    except ValueError:
        raise MalformedRollout(f"{where}.finish_reason {finish!r} is unknown") from None
    details = fields.get("verifier_details", dict)
    for key, value in details.items():
        if not isinstance(key, str) or not isinstance(value, (str, int, float, bool, type(None))):
            raise MalformedRollout(f"{where}.verifier_details[{key!r}] is not a scalar")
    completion = Completion(
        token_ids=_from_wire(fields.get("token_ids", bytes), "token_ids", where),
        behaviour_logprobs=_from_wire(
            fields.get("behaviour_logprobs", bytes), "behaviour_logprobs", where
        ),
        loss_mask=_from_wire(fields.get("loss_mask", bytes), "loss_mask", where),
        policy_versions=VersionRuns(
            versions=_from_wire(fields.get("versions", bytes), "versions", where),
            lengths=_from_wire(fields.get("lengths", bytes), "lengths", where),
        ),
        reward=fields.get("reward", float),
        finish_reason=finish_reason,
        verifier_details=details,
        generation_s=fields.get("generation_s", float),
    )
    fields.expect_no_more()
    return completion


def _to_wire(array: np.ndarray, kind: str) -> bytes:
    return np.ascontiguousarray(array, dtype=_WIRE_DTYPES[kind]).tobytes()


def _from_wire(raw: bytes, kind: str, where: str) -> np.ndarray:
    wire = _WIRE_DTYPES[kind]
    if len(raw) % wire.itemsize:
        raise MalformedRollout(
            f"{where}.{kind} has {len(raw)} bytes, not a multiple of {wire.itemsize}"
        )
    array = np.frombuffer(raw, dtype=wire)
    if kind == "loss_mask" and array.size and array.max() > 1:
        raise MalformedRollout(f"{where}.loss_mask holds a value other than 0 or 1")
    return array.astype(_HOST_DTYPES[kind])


def _reject_ext(code: int, data: bytes) -> None:
    raise MalformedRollout(f"msgpack extension type {code} is not part of the rollout schema")


class _Fields:
    """Typed access to a decoded msgpack map that names the offending field in errors."""

    def __init__(self, payload: object, where: str) -> None:
        if not isinstance(payload, dict):
            raise MalformedRollout(f"{where} is a {type(payload).__name__}, expected a map")
        self.payload = payload
        self.where = where
        self.seen: set[str] = set()

    def get(self, key: str, kind: type) -> Any:
        if key not in self.payload:
            raise MalformedRollout(f"{self.where}.{key} is missing")
        value = self.payload[key]
        self.seen.add(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise MalformedRollout(
                f"{self.where}.{key} is a {type(value).__name__}, expected {kind.__name__}"
            )
        return value

    def expect_no_more(self) -> None:
        extra = set(self.payload) - self.seen
        if extra:
            raise MalformedRollout(f"{self.where} has unknown fields {sorted(extra)}")
