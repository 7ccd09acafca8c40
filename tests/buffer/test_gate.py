"""Producers' credentials and the gate, against a real redis-server: a credential puts
groups through the gate and can do nothing else; hostile groups sent with it are refused
or quarantined naming the producer; its credential is revoked past the limit; the
learner re-checks what it samples."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
import redis

from buffer.codec import encode_groups
from buffer.config import BufferConfig
from buffer.credentials import CredentialError, Credentials, credential_url, name_from_url
from buffer.gate import Gate, GateClient, GateError
from buffer.polling import poll
from buffer.replay_buffer import ReplayBuffer
from buffer.schema import RolloutGroup
from buffer.server import RedisServer, connect
from buffer.stats import read_stats
from tests.buffer.factories import make_completion, make_group, versioned_group


@pytest.fixture
def gated(redis_server: RedisServer, make_buffer) -> Iterator[tuple[ReplayBuffer, Credentials]]:
    """A learner's buffer (vocabulary 128, sequences of 32) with its gate serving."""
    buffer = make_buffer(groups_per_version=8, vocab_size=128, max_sequence_tokens=32,
                         revoke_after_bad_groups=5)  # fmt: skip
    gate = Gate(buffer).start()
    yield buffer, Credentials(buffer.client, buffer.config.key_prefix)
    gate.stop()


def producer(
    redis_server: RedisServer, buffer: ReplayBuffer, name: str, actor: str, outage_limit_s=20.0
) -> GateClient:
    """A producer logged in with a new credential `name`."""
    password = Credentials(buffer.client, buffer.config.key_prefix).create(name)
    url = credential_url(redis_server.url, buffer.config.key_prefix, name, password)
    assert name_from_url(url, buffer.config.key_prefix) == name
    config = buffer.config.model_copy(update={"outage_limit_s": outage_limit_s})
    return GateClient(connect(url, outage_limit_s), config, name, actor)


def is_off(buffer: ReplayBuffer, name: str) -> bool:
    user = buffer.client.acl_getuser(f"{buffer.config.key_prefix}.{name}")
    return "off" in user["flags"]


def test_a_credential_puts_through_the_gate_and_can_do_nothing_else(
    redis_server: RedisServer, gated, make_buffer
) -> None:
    buffer, _ = gated
    actor = producer(redis_server, buffer, "pool-a", "host-1")
    assert actor.release_producer() == 0
    version, leases = actor.reserve(2)
    groups = [
        dataclasses.replace(versioned_group(f"pool-a.g{i}", version), actor_id="pool-a/host-1")
        for i in range(2)
    ]
    assert actor.put(groups, leases).stored == 2
    actor.set_health({"groups": 2})
    assert actor.version() == 0
    # The weight store's keys it may read, several at once (a delta chain's manifests).
    weights = buffer.keyspace
    assert actor.client.mget([weights.weights_manifest(1), weights.weights_latest]) == [None, None]

    other = make_buffer()  # another experiment on the same Redis
    other.put([versioned_group("theirs", 0)], "them")
    keys = buffer.keyspace
    forbidden = [
        lambda: actor.client.incr(keys.of("learner_epoch")),
        lambda: actor.client.delete(keys.of("ready")),
        lambda: actor.client.set(keys.payload("x"), b"forged"),
        lambda: actor.client.hgetall(keys.of("counters")),
        lambda: actor.client.get(keys.payload("pool-a.g0")),
        lambda: actor.client.get(other.keyspace.of("version")),
        lambda: actor.client.mget([keys.weights_latest, keys.payload("pool-a.g0")]),
        lambda: actor.client.eval("while true do end", 0),
        lambda: actor.client.script_load("return 1"),
        lambda: actor.client.execute_command("FUNCTION", "LIST"),
        lambda: actor.client.keys("*"),
        lambda: actor.client.config_get("maxmemory"),
        lambda: actor.client.flushall(),
        lambda: actor.client.rpush(keys.inbox("pool-b"), b"x"),  # another credential's inbox
        lambda: actor.client.rpush(keys.outbox("pool-a", "host-1"), b"forged reply"),
        lambda: actor.client.execute_command("CLIENT", "KILL", "USER", "default"),
        lambda: actor.client.execute_command("ACL", "SETUSER", "x", "on"),
    ]
    for attempt in forbidden:
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()

    batch = buffer.sample(2)
    assert {s.group.actor_id for s in batch.groups} == {"pool-a/host-1"}
    assert buffer.ack(batch).acked == 2
    stats = read_stats(buffer)
    assert [(p.producer_id, p.groups) for p in stats.producers] == [("pool-a/host-1", 2)]


def hostile_groups() -> dict[str, object]:
    """What a hostile producer of credential `evil` (actor `x`) might send as groups."""

    def forged(**changes: object) -> RolloutGroup:
        group = versioned_group("evil.g", 0)
        return dataclasses.replace(group, **{"actor_id": "evil/x", **changes})

    oov = make_completion(4, 0, token_ids=np.array([1, 2, 3, 1_000_000], np.int32))
    return {
        "token outside the vocabulary": forged(completions=[oov]),
        "longer than the engine's": forged(completions=[make_completion(40, 0)]),
        "a version the learner has not reached": forged(completions=[make_completion(4, 7)]),
        "a group id with a key pattern": forged(group_id="evil*"),
        "another producer's id": forged(actor_id="pool-a/host-1"),
    }


def test_hostile_groups_are_refused_naming_the_producer_then_it_is_revoked(
    redis_server: RedisServer, gated
) -> None:
    buffer, credentials = gated
    evil = producer(redis_server, buffer, "evil", "x", outage_limit_s=3)
    honest = producer(redis_server, buffer, "honest", "honest")
    cases = hostile_groups()
    reasons = {}
    for what, group in list(cases.items())[:4]:
        _, leases = evil.reserve(1)
        payload = encode_groups([group])[0].payload
        reply = evil._call("put", groups=[payload], leases=leases)
        assert reply["stored"] == 0 and len(reply["refused"]) == 1, what
        reasons[what] = reply["refused"][0][1]
    assert "outside the model's vocabulary" in reasons["token outside the vocabulary"]
    assert "over the engine's 32" in reasons["longer than the engine's"]
    assert "above the learner's 0" in reasons["a version the learner has not reached"]
    records = buffer.quarantined()
    assert "group id must be" in reasons["a group id with a key pattern"]
    assert {r.producer for r in records} == {"evil/x"} and len(records) == 4
    # The honest producer is not affected; the fifth bad group revokes `evil`.
    _, leases = honest.reserve(1)
    group = dataclasses.replace(versioned_group("honest.g", 0), actor_id="honest")
    assert honest.put([group], leases).stored == 1
    _, leases = evil.reserve(1)
    payload = encode_groups([cases["another producer's id"]])[0].payload
    with pytest.raises(redis.exceptions.AuthenticationError):  # cut off while it waited
        evil._call("put", groups=[payload], leases=leases)
    assert is_off(buffer, "evil") and not is_off(buffer, "honest")
    (record,) = [c for c in credentials.records() if c.name == "evil"]
    assert record.refused == 5 and record.revoked_at is not None
    assert "5 bad groups" in record.revoked_reason
    assert credentials.active() == ["honest"]
    producers = [(p.producer_id, p.refused, p.revoked) for p in read_stats(buffer).producers]
    assert producers == [("evil/x", 5, True), ("honest", 0, False)]


def test_malformed_requests_count_against_the_credential(redis_server: RedisServer, gated) -> None:
    buffer, credentials = gated
    evil = producer(redis_server, buffer, "evil", "x", outage_limit_s=3)
    inbox = buffer.keyspace.inbox("evil")
    deep = b"\x91" * 5000 + b"\xc0"  # an array nested 5,000 deep
    for raw in (b"\xc1 not msgpack", deep, msgpack.packb([1, 2, 3])):
        evil.client.rpush(inbox, raw)
    with pytest.raises(GateError, match="unknown op"):
        evil._call("flushall")
    with pytest.raises(redis.exceptions.AuthenticationError):
        evil._call("release", leases=["honest:1"], reason=None)  # the fifth: revoked
    (record,) = credentials.records()
    assert record.refused == 5 and record.revoked_at is not None
    reasons = [r.reason for r in buffer.quarantined()]
    assert "was not granted to 'evil/x'" in reasons[-1] and "unreadable" in reasons[0]


def test_the_learner_rechecks_what_it_samples(redis_server: RedisServer, make_buffer) -> None:
    # Groups stored without any check (as a compromised gate or an admin would) are
    # quarantined when sampled, naming their producer, and never trained on.
    buffer = make_buffer(vocab_size=128, max_sequence_tokens=32, admission_control=False)
    credentials = Credentials(buffer.client, buffer.config.key_prefix)
    credentials.create("cut")
    bad = {
        "oov": make_group(make_completion(4, 0, token_ids=np.array([1, 2, 3, 999], np.int32))),
        "long": make_group(make_completion(40, 0)),
        "future": make_group(make_completion(4, 5)),
        "revoked": make_group(make_completion(4, 0), actor_id="cut/a"),
        "z-fine": make_group(make_completion(4, 0)),  # claimed after the others
    }
    for name, group in bad.items():
        (encoded,) = encode_groups([dataclasses.replace(group, group_id=name)])
        buffer.store([encoded], [name], [""], group.actor_id)
    credentials.revoke("cut", "by hand")
    batch = buffer.sample(1, timeout_s=5)
    assert [s.group.group_id for s in batch.groups] == ["z-fine"]
    assert buffer.sample(1, timeout_s=0.5).groups == []  # "future" comes last, and goes
    reasons = {r.entry_id: r.reason for r in buffer.quarantined()}
    assert set(reasons) == {"oov", "long", "future", "revoked"}
    assert "token id 999 is outside" in reasons["oov"] and "'actor-0'" in reasons["oov"]
    assert "43 tokens, over the engine's 32" in reasons["long"]
    assert "version 5, above the learner's 0" in reasons["future"]
    assert "credential 'cut' was revoked" in reasons["revoked"]


def test_credentials_come_back_after_a_redis_restart(tmp_path, make_buffer) -> None:
    from buffer.config import BufferConfig, RedisServerConfig

    with RedisServer(tmp_path / "redis", RedisServerConfig()) as server:
        buffer = ReplayBuffer(server.client(), BufferConfig(key_prefix="restart"))
        credentials = Credentials(buffer.client, "restart")
        password = credentials.create("a")
        with pytest.raises(CredentialError, match="exists"):
            credentials.create("a")
        url = credential_url(server.url, "restart", "a", password)
        server.kill()
        server.start()
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(url).ping()
        assert credentials.restore() == 1
        assert redis.Redis.from_url(url).get("restart:version") is None
        with pytest.raises(CredentialError, match="not an actor credential"):
            name_from_url(server.url, "restart")


def test_spot_checks_refuse_what_the_trusted_verifier_disagrees_with(
    redis_server: RedisServer, make_buffer
) -> None:
    # The check itself is actors/spot_check.py (tests/actors/test_spot_check.py); here, a
    # stand-in that disagrees with groups named "forged*", on every group (fraction 1).
    buffer = make_buffer(admission_control=False, spot_check_fraction=1.0)
    gate = Gate(buffer, spot_check=lambda g: "forged" if g.group_id.startswith("f") else None)
    gate.start()
    try:
        actor = producer(redis_server, buffer, "pool", "a")
        groups = [dataclasses.replace(versioned_group(gid, 0), actor_id="pool/a")
                  for gid in ("honest", "forged")]  # fmt: skip
        result = actor.put(groups)
    finally:
        gate.stop()
    assert result.stored == 1 and result.refused == [("forged", "forged")]
    counters = read_stats(buffer).counters
    assert (counters["spot_checked"], counters["spot_check_failed"]) == (2, 1)


def test_a_memory_flood_is_bounded_drained_and_its_producer_revoked(tmp_path) -> None:
    from buffer.config import RedisServerConfig

    with RedisServer(tmp_path / "redis", RedisServerConfig(maxmemory_mib=64)) as server:
        buffer = ReplayBuffer(server.client(), BufferConfig(key_prefix="flood"))
        assert server.client().config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        gate = Gate(buffer).start()
        try:
            flooder = producer(server, buffer, "flood", "x", outage_limit_s=3)
            honest = producer(server, buffer, "honest", "honest")
            outcomes = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # 8 MiB at a time against a 64 MiB server
                try:
                    flooder.client.rpush(buffer.keyspace.inbox("flood"), b"x" * (8 << 20))
                    outcomes.append("pushed")
                except redis.exceptions.OutOfMemoryError:
                    outcomes.append("refused: out of memory")  # never evicted
                except redis.exceptions.AuthenticationError:
                    outcomes.append("revoked")
                    break
            assert outcomes[-1] == "revoked"
            version, leases = honest.reserve(1)
            group = dataclasses.replace(versioned_group("honest.g", version), actor_id="honest")
            assert honest.put([group], leases).stored == 1
        finally:
            gate.stop()
        assert gate.failure is None
        records = {c.name: c for c in Credentials(buffer.client, "flood").records()}
        assert records["flood"].refused >= 8 and records["flood"].revoked_at is not None
        assert buffer.client.llen(buffer.keyspace.inbox("flood")) == 0


def test_channels_of_one_producer_get_their_own_answers(redis_server: RedisServer, gated) -> None:
    """An actor's put thread and its main thread call the gate at once: each gets the
    answers to its own requests, and a malformed reply box counts against the credential."""
    buffer, credentials = gated
    main = producer(redis_server, buffer, "pool-c", "host-1")
    puts = main.channel("put")
    results: dict[str, list] = {"main": [], "put": []}

    def call_many(name: str, client: GateClient) -> None:
        for _ in range(20):
            results[name].append(client.reserve(1))

    threads = [threading.Thread(target=call_many, args=item) for item in
               (("main", main), ("put", puts))]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [len(results[n]) for n in ("main", "put")] == [20, 20]
    leases = [lease for _, granted in results["main"] + results["put"] for lease in granted]
    assert all(lease.startswith("pool-c/host-1:") for lease in leases)
    assert len(set(leases)) == len(leases)
    main._send({"op": "reserve", "rid": "r1", "actor": "host-1", "box": "../x", "n": 1})

    def refused() -> int | None:
        (record,) = [r for r in credentials.records() if r.name == "pool-c"]
        return record.refused or None

    assert poll(refused, timeout_s=10) == 1
