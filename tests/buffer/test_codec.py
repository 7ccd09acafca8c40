"""Encoding round trips and rejection of corrupted bytes (property tests)."""

from __future__ import annotations

import pickle
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buffer.codec import decode_group, encode_group, encode_groups, read_fields, write_fields
from buffer.schema import SCHEMA_VERSION, MalformedRollout, RolloutGroup
from tests.buffer.factories import make_completion, make_group
from tests.buffer.strategies import rollout_groups

settings.register_profile("relay", suppress_health_check=[HealthCheck.too_slow], deadline=None)
settings.load_profile("relay")


@given(rollout_groups())
def test_round_trip(group: RolloutGroup) -> None:
    assert decode_group(encode_group(group)) == group


@given(rollout_groups())
def test_arrays_are_little_endian_columns(group: RolloutGroup) -> None:
    raw = encode_group(group)
    payload = read_fields(raw)
    assert payload["schema"] == SCHEMA_VERSION
    assert payload["prompt_token_ids"] == group.prompt_token_ids.astype("<i4").tobytes()
    logprobs = np.concatenate([c.behaviour_logprobs for c in group.completions])
    assert payload["behaviour_logprobs"] == logprobs.astype("<f4").tobytes()
    lengths = [c.n_tokens for c in group.completions]
    assert payload["completion_lengths"] == np.array(lengths, "<i4").tobytes()
    # A fixed prefix (schema version, header length, each array's byte count), then a
    # positional msgpack header (no arrays inside), then the arrays back to back.
    schema, header_length, *sizes = struct.unpack_from("<II10I", raw)
    assert schema == SCHEMA_VERSION
    header = msgpack.unpackb(raw[48 : 48 + header_length])
    assert header[:2] == [group.run_id, group.group_id] and len(header) == 8
    assert sizes[2] == sum(c.n_tokens for c in group.completions) * 4  # token_ids
    assert len(raw) == 48 + header_length + sum(sizes)
    # Decoded arrays are views into the bytes Redis returned, not copies.
    decoded = decode_group(raw).completions[0].token_ids
    assert not decoded.flags.owndata and not decoded.flags.writeable


@given(rollout_groups(), st.data())
def test_truncated_bytes_are_rejected(group: RolloutGroup, data: st.DataObject) -> None:
    raw = encode_group(group)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(MalformedRollout):
        decode_group(raw[:cut])


@given(rollout_groups(), st.data())
def test_flipped_bytes_decode_or_raise_malformed(group: RolloutGroup, data: st.DataObject) -> None:
    # A flip inside a payload value (a reward, a token id) can still be a valid group;
    # anything else must be reported as MalformedRollout, never as another exception.
    raw = bytearray(encode_group(group))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] ^= data.draw(st.integers(1, 255))
    try:
        decoded = decode_group(bytes(raw))
    except MalformedRollout:
        return
    decoded.validate()


@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_decoder(raw: bytes) -> None:
    with pytest.raises(MalformedRollout):
        decode_group(raw)


def test_pickle_is_never_unpickled() -> None:
    with pytest.raises(MalformedRollout):
        decode_group(pickle.dumps(make_group()))


def _reencode(mutate: object) -> bytes:
    payload = read_fields(encode_group(make_group()))
    mutate(payload)
    return write_fields(payload)


def _i4(*values: int) -> bytes:
    return np.array(values, "<i4").tobytes()


# make_group(): one completion of 4 tokens, one version run.
@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p.update(schema=SCHEMA_VERSION + 1), "schema version"),
        (lambda p: p.update(run_id=""), "run_id must be a non-empty string"),
        (lambda p: p.update(created_at="now"), "created_at is a str"),
        (
            lambda p: p.update(rewards=np.array([np.nan]).tobytes()),
            r"completions\[0\].reward is not finite",
        ),
        (lambda p: p.update(token_ids=b"\x00" * 7), "not a multiple of 4"),
        (
            lambda p: p.update(token_ids=_i4(0, 1, -5, 3)),
            r"completions\[0\].token_ids has a negative",
        ),
        (lambda p: p.update(loss_mask=b"\x02" * 4), "other than 0 or 1"),
        (lambda p: p.update(completion_lengths=_i4(5)), "holds 4 entries for 5 tokens"),
        (lambda p: p.update(finish_reasons=["exploded"]), "unknown reason"),
        (lambda p: p.update(verifier_details=[{"x": [1]}]), r"\[.x.\] is a list, not a str"),
        (lambda p: p.update(version_lengths=_i4(9)), r"completions\[0\].policy_versions covers 9"),
        (lambda p: p.update(runs_per_completion=_i4(2)), "mismatched or empty runs"),
        (lambda p: p.update(rewards=b""), "rewards has 0 entries for 1 completions"),
        (lambda p: p.update(generation_s=b"\x00" * 12), "not a multiple of 8"),
    ],
)
def test_decoder_names_what_is_wrong(mutate: object, message: str) -> None:
    with pytest.raises(MalformedRollout, match=message):
        decode_group(_reencode(mutate))


def _framed(header: bytes, sizes: tuple = (0,) * 10, schema: int = SCHEMA_VERSION) -> bytes:
    return struct.pack("<II10I", schema, len(header), *sizes) + header


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x03\x00", "too short"),
        (struct.pack("<II10I", SCHEMA_VERSION, 10**6, *[0] * 10), "need 1000048 bytes"),
        (_framed(b"\x90", schema=2), "schema version 2, this decoder reads"),
        (_framed(b"\x90"), "header holds 0 fields, expected a list of 8: run_id, group_id"),
        (_framed(b"\x80"), "header holds a dict"),
        (_framed(b"\xc1"), "not a rollout header"),
        (_framed(msgpack.packb(1), sizes=(1,) + (0,) * 9) + b"\x00", "not a multiple of 4"),
        (_framed(b"\xd4\x01\x00"), "extension type 1"),
    ],
)
def test_framing_errors_are_named(raw: bytes, message: str) -> None:
    with pytest.raises(MalformedRollout, match=message):
        decode_group(raw)


def test_arrays_must_fill_the_payload_exactly() -> None:
    raw = encode_group(make_group())
    with pytest.raises(MalformedRollout, match="header and arrays need"):
        decode_group(raw + b"\x00")
    with pytest.raises(MalformedRollout, match="header and arrays need"):
        decode_group(raw[:-1])


def test_encode_refuses_an_invalid_group() -> None:
    bad = make_group(make_completion(reward=float("inf")))
    with pytest.raises(MalformedRollout, match="reward"):
        encode_group(bad)


@pytest.mark.parametrize("value", [[1], {"a": 1}, np.float64(0.5), b"raw"])
def test_encode_refuses_verifier_details_that_are_not_scalars(value: object) -> None:
    bad = make_group(make_completion(verifier_details={"score": value}), group_id="bad")
    with pytest.raises(MalformedRollout, match=r"group 'bad': .*\['score'\] is a .*\.item\(\)"):
        encode_groups([make_group(), bad])


def test_encoding_a_batch_names_the_invalid_group() -> None:
    good = make_group(group_id="good")
    nan_reward = make_group(make_completion(reward=float("nan")), group_id="nan")
    wide = make_group(make_completion(token_ids=np.arange(4, dtype=np.int64)), group_id="wide")
    with pytest.raises(MalformedRollout, match=r"group 'nan': completions\[0\]\.reward"):
        encode_groups([good, nan_reward, good])
    with pytest.raises(MalformedRollout, match=r"group 'wide': .*dtype int64"):
        encode_groups([good, wide])
    # A valid batch round-trips group by group, each payload alone.
    groups = [
        make_group(group_id=f"g{i}", prompt_token_ids=np.arange(i + 1, dtype=np.int32))
        for i in range(3)
    ]
    assert [decode_group(e.payload) for e in encode_groups(groups)] == groups
