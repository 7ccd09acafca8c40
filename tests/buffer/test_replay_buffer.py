"""The replay buffer against a real redis-server: the guarantees in docs/buffer.md."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from buffer.codec import encode_group, read_fields, write_fields
from buffer.config import RedisServerConfig
from buffer.replay_buffer import BufferFull, ReplayBuffer
from buffer.server import RedisServer, RedisServerError
from buffer.stats import percentile, read_stats
from tests.buffer import workers
from tests.buffer.factories import make_completion, make_group, versioned_group


def test_round_trip_and_ack(make_buffer: object) -> None:
    buffer = make_buffer()
    groups = [versioned_group(f"g{i}", version=0) for i in range(6)]
    assert buffer.put(groups, "actor-0").stored == 6
    batch = buffer.sample(6)
    assert sorted(g.group.group_id for g in batch.groups) == [f"g{i}" for i in range(6)]
    by_id = {g.group_id: g for g in groups}
    assert all(s.group == by_id[s.group.group_id] for s in batch.groups)
    assert buffer.ack(batch).acked == 6
    stats = read_stats(buffer)
    assert (stats.depth, stats.claimed, stats.bytes) == (0, 0, 0)
    assert stats.counters["acked"] == 6


def test_sample_waits_for_a_full_batch_and_holds_nothing_meanwhile(make_buffer: object) -> None:
    buffer = make_buffer()
    buffer.put([versioned_group("a", 0), versioned_group("b", 0)], "actor-0")
    assert buffer.sample(3, timeout_s=0.2).groups == []
    assert read_stats(buffer).claimed == 0
    threading.Timer(0.2, lambda: buffer.put([versioned_group("c", 0)], "actor-0")).start()
    assert len(buffer.sample(3, timeout_s=5).groups) == 3


def test_staleness_filter_takes_oldest_admissible_and_drops_the_rest(make_buffer: object) -> None:
    buffer = make_buffer(max_staleness=2)
    buffer.put([versioned_group(f"v{v}", version=v) for v in range(6)], "actor-0")
    buffer.set_version(5)
    # Admissible: versions 3, 4, 5 (staleness <= 2); 0, 1, 2 are dropped and counted.
    batch = buffer.sample(2)
    assert [g.group.group_id for g in batch.groups] == ["v3", "v4"]
    assert [g.staleness for g in batch.groups] == [2, 1]
    stats = read_stats(buffer)
    assert stats.counters["dropped_stale"] == 3
    assert stats.sampled_staleness_histogram == {1: 1, 2: 1}
    assert stats.depth == 1


def test_retried_puts_are_not_duplicated(make_buffer: object) -> None:
    buffer = make_buffer()
    group = versioned_group("once", 0)
    assert buffer.put([group], "actor-0").stored == 1
    assert buffer.put([group], "actor-0").duplicates == 1
    buffer.ack(buffer.sample(1))
    # Acked already: a late retry is refused too, within the dedup window.
    assert buffer.put([group], "actor-0").duplicates == 1
    assert read_stats(buffer).depth == 0


def test_visibility_timeout_redelivers_and_fences_the_late_owner(make_buffer: object) -> None:
    buffer = make_buffer(visibility_timeout_s=1.0)
    buffer.put([versioned_group("x", 0), versioned_group("y", 0)], "actor-0")
    first = buffer.sample(2)
    assert buffer.sample(2, timeout_s=0.1).groups == []  # still claimed
    time.sleep(1.2)
    second = buffer.sample(2, timeout_s=1)
    assert sorted(second.entry_ids) == sorted(first.entry_ids)
    late = buffer.ack(first)
    assert (late.acked, late.stale_claims) == (0, 2)
    assert buffer.ack(second).acked == 2
    counters = read_stats(buffer).counters
    assert (counters["redelivered"], counters["acked"], counters["stale_acks"]) == (2, 2, 2)


def test_claims_are_recorded_per_batch_and_acked_in_parts(make_buffer: object) -> None:
    buffer = make_buffer()
    buffer.put([versioned_group(f"p{i}", 0) for i in range(4)], "actor-0")
    batch = buffer.sample(4)
    # One deadline per sample call; the claimed count is still in groups.
    assert buffer.client.zrange(buffer.key("claimed"), 0, -1) == [batch.token.encode()]
    assert read_stats(buffer).claimed == 4
    first, second = batch.entry_ids[:1], batch.entry_ids[1:]
    part = buffer._ack_result(buffer._run("ack", batch.token, 1, 2, *first, *first, "0", "0"))
    assert (part.acked_ids, part.stale_claims) == (first, 1)  # a repeated id is acked once
    assert read_stats(buffer).claimed == 3
    rest = buffer.ack(batch)  # the acked id again, and the three still held
    assert (sorted(rest.acked_ids), rest.stale_claims) == (sorted(second), 1)
    stats = read_stats(buffer)
    assert (stats.claimed, stats.counters["acked"]) == (0, 4)
    assert not buffer.client.exists(buffer.key("claimed"), buffer.key("claims"))


def test_a_partial_batch_is_given_back_at_once(make_buffer: object) -> None:
    # Three entries, one garbage: sample(3) quarantines it, finds no replacement in time,
    # and gives the two good claims back at once rather than at the visibility timeout.
    buffer = make_buffer(visibility_timeout_s=60.0)
    buffer.put([versioned_group("ok-1", 0), versioned_group("ok-2", 0)], "actor-0")
    buffer.client.set(buffer.payload_key("bad"), b"garbage")
    buffer.client.zadd(buffer.key("ready"), {"bad": -1})  # claimed first: oldest
    buffer.client.zadd(buffer.key("live"), {"bad": -1})
    assert buffer.sample(3, timeout_s=0.2).groups == []
    assert read_stats(buffer).counters["quarantined"] == 1
    again = buffer.sample(2, timeout_s=0.1)
    assert sorted(again.entry_ids) == ["ok-1", "ok-2"]
    assert buffer.ack(again).acked == 2


def test_many_producers_and_crashing_consumers_deliver_each_group_exactly_once(
    make_buffer: object, redis_server: RedisServer, tmp_path: Path
) -> None:
    buffer = make_buffer()
    prefix = buffer.config.key_prefix
    spawn = multiprocessing.get_context("spawn")
    producers = [
        spawn.Process(target=workers.produce, args=(redis_server.url, prefix, p, 40))
        for p in range(4)
    ]
    for process in producers:
        process.start()
    acked_log = tmp_path / "acked.log"
    crashes = 0
    consumers: list = []
    deadline = time.monotonic() + 240
    seed = 0
    # Two consumers at a time; one that crashes is replaced, as a supervisor would.
    while time.monotonic() < deadline:
        alive = [c for c in consumers if c.is_alive()]
        crashes += sum(1 for c in consumers if not c.is_alive() and c.exitcode == 3)
        consumers = alive
        if read_stats(buffer).counters["acked"] == 160:
            break
        while len(consumers) < 2:
            seed += 1
            consumer = spawn.Process(
                target=workers.consume,
                args=(redis_server.url, prefix, 1.0, 0.25, str(acked_log), seed),
            )
            consumer.start()
            consumers.append(consumer)
        time.sleep(0.2)
    for process in producers + consumers:
        process.join()
    acked = acked_log.read_text().split()
    expected = {f"p{p}-{i}" for p in range(4) for i in range(40)}
    assert Counter(acked) == Counter(expected), "every group acked exactly once"
    counters = read_stats(buffer).counters
    assert counters["put"] == 160
    assert counters["acked"] == 160
    if crashes:
        assert counters["redelivered"] >= 1


def test_acknowledged_work_survives_a_redis_crash(tmp_path: Path) -> None:
    from buffer.config import BufferConfig

    server = RedisServer(tmp_path / "redis", RedisServerConfig(appendfsync="everysec")).start()
    try:
        buffer = ReplayBuffer(server.client(), BufferConfig(key_prefix="crash"))
        buffer.put([versioned_group(f"g{i}", 0) for i in range(20)], "actor-0")
        acked = buffer.ack(buffer.sample(8)).acked_ids
        buffer.bump_version()
        server.kill()  # SIGKILL: no shutdown, no final flush
        server.start()  # same directory, port and password: replays the AOF
        buffer = ReplayBuffer(server.client(), BufferConfig(key_prefix="crash"))
        stats = read_stats(buffer)
        assert (stats.depth, stats.learner_version, stats.counters["acked"]) == (12, 1, 8)
        remaining = buffer.sample(12)
        assert not set(remaining.entry_ids) & set(acked)
        assert buffer.put([versioned_group(acked[0], 0)], "actor-0").duplicates == 1
    finally:
        server.stop()


class _Exploit:
    """Unpickling this would create a file: proof that nothing is ever unpickled."""

    marker: Path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_garbage_pickle_and_nan_entries_are_quarantined_not_executed(
    make_buffer: object, tmp_path: Path
) -> None:
    buffer = make_buffer()
    _Exploit.marker = tmp_path / "pwned"
    nan_reward = read_fields(encode_group(versioned_group("nan", 0)))
    nan_reward["rewards"] = np.array([float("nan"), 1.0]).tobytes()
    planted = {
        "garbage": os.urandom(64),
        "pickle": pickle.dumps(_Exploit()),
        "nan": write_fields(nan_reward),
    }
    for entry_id, payload in planted.items():  # written straight into the keys
        buffer.client.set(buffer.payload_key(entry_id), payload)
        buffer.client.zadd(buffer.key("ready"), {entry_id: 0})
        buffer.client.zadd(buffer.key("live"), {entry_id: 0})
    buffer.put([versioned_group("good", 0)], "actor-0")
    delivered = buffer.sample(1, timeout_s=1).groups + buffer.sample(1, timeout_s=0.3).groups
    assert [g.group.group_id for g in delivered] == ["good"]
    records = {r.entry_id: r for r in buffer.quarantined()}
    assert set(records) == set(planted)
    assert records["pickle"].payload == planted["pickle"]
    assert "reward is not finite" in records["nan"].reason
    assert not _Exploit.marker.exists()
    assert read_stats(buffer).counters["quarantined"] == 3


def test_backpressure_blocks_until_room_then_times_out(make_buffer: object) -> None:
    buffer = make_buffer(capacity_groups=3, put_timeout_s=5)
    buffer.put([versioned_group(f"g{i}", 0) for i in range(3)], "actor-0")
    finished = threading.Event()

    def put_one_more() -> None:
        buffer.put([versioned_group("late", 0)], "actor-0")
        finished.set()

    threading.Thread(target=put_one_more, daemon=True).start()
    assert not finished.wait(0.5), "a put into a full buffer must block"
    buffer.ack(buffer.sample(1))
    assert finished.wait(5), "acking made room: the blocked put must go through"
    impatient = make_buffer(capacity_groups=1, put_timeout_s=0.3)
    impatient.put([versioned_group("a", 0)], "actor-0")
    with pytest.raises(BufferFull, match="capacity_groups=1"):
        impatient.put([versioned_group("b", 0)], "actor-0")


def test_byte_capacity_and_drop_oldest(make_buffer: object) -> None:
    size = len(encode_group(versioned_group("g0", 0)))
    buffer = make_buffer(capacity_mib=2.5 * size / 2**20, overflow="drop_oldest")
    buffer.put(
        [versioned_group("g0", 0), versioned_group("g1", 1), versioned_group("g2", 2)], "actor-0"
    )
    stats = read_stats(buffer)
    assert stats.depth == 2
    assert stats.counters["dropped_capacity"] == 1
    buffer.set_version(2)  # the learner never samples tokens of versions it has not reached
    assert [g.group.group_id for g in buffer.sample(2).groups] == ["g1", "g2"]


def test_admission_control_bounds_staleness_under_a_slow_consumer(make_buffer: object) -> None:
    max_staleness, per_version = 2, 4
    buffer = make_buffer(
        max_staleness=max_staleness, groups_per_version=per_version, admission_control=True
    )
    stop = threading.Event()

    def actor(index: int) -> None:
        serial = 0
        while not stop.is_set():
            version, leases = buffer.reserve(f"actor-{index}", 2)
            if not leases:
                time.sleep(0.01)
                continue
            groups = [
                versioned_group(f"a{index}-{serial + i}", version) for i in range(len(leases))
            ]
            serial += len(leases)
            buffer.put(groups, f"actor-{index}", leases)

    threads = [threading.Thread(target=actor, args=(i,), daemon=True) for i in range(3)]
    for thread in threads:
        thread.start()
    trained = []
    for _ in range(12):  # a slow learner: one batch per version, with a pause
        batch = buffer.sample(per_version, timeout_s=10)
        assert len(batch.groups) == per_version
        time.sleep(0.05)
        trained += [g.staleness for g in batch.groups]
        buffer.ack(batch)
        buffer.bump_version()
    stop.set()
    for thread in threads:
        thread.join(5)
    stats = read_stats(buffer)
    assert max(trained) <= max_staleness
    assert stats.counters["dropped_stale"] == 0, (
        "admission control bounds staleness without dropping"
    )
    assert stats.depth + stats.claimed + stats.in_flight <= (max_staleness + 1) * per_version


def test_replay_trains_a_group_again_and_counts_each_use(make_buffer: object) -> None:
    buffer = make_buffer(replay=2)
    buffer.put([versioned_group("r", 0)], "actor-0")
    first = buffer.sample(1)
    assert first.groups[0].reuse == 0
    assert buffer.ack(first).reused == 1  # offered for its second use
    second = buffer.sample(1, timeout_s=1)
    assert second.groups[0].reuse == 1
    assert buffer.ack(second).reused == 0  # its last use: forgotten
    assert buffer.sample(1).groups == []
    stats = read_stats(buffer)
    assert (stats.depth, stats.replay_depth, stats.claimed) == (0, 0, 0)
    assert (stats.counters["reused"], stats.counters["acked"]) == (1, 2)
    assert stats.sampled_uses_histogram == {1: 1, 2: 1}
    assert stats.replayed_share == 0.5


def test_stats_of_known_groups(make_buffer: object) -> None:
    buffer = make_buffer(max_staleness=10)
    buffer.put([versioned_group("a", 1, tokens=5), versioned_group("b", 1)], "actor-0")
    buffer.put([versioned_group("c", 3)], "actor-1")
    buffer.put(
        [make_group(make_completion(4, version=2), make_completion(4, version=4), group_id="d")],
        "actor-1",
    )
    buffer.set_version(4)
    stats = read_stats(buffer)
    # Staleness uses each group's oldest token: a, b -> 3; c -> 1; d -> 4 - 2 = 2.
    assert stats.staleness_histogram == {1: 1, 2: 1, 3: 2}
    assert stats.ready_staleness_histogram == stats.staleness_histogram  # none claimed yet
    buffer.sample(2)  # claims a and b, the oldest: no longer ready
    assert read_stats(buffer).ready_staleness_histogram == {1: 1, 2: 1}
    assert read_stats(buffer).staleness_histogram == {1: 1, 2: 1, 3: 2}
    assert percentile(stats.staleness_histogram, 0.5) == 2
    assert stats.metrics()["buffer/staleness_max"] == 3
    assert stats.depth == 4
    assert stats.counters["put_tokens"] == 2 * 5 + 2 * 4 + 2 * 4 + 2 * 4
    lag = {p.producer_id: (p.groups, p.last_version, p.version_lag) for p in stats.producers}
    # actor-1's latest group ends on version 4 tokens (d's second completion): lag 0.
    assert lag == {"actor-0": (2, 1, 3), "actor-1": (2, 4, 0)}


def test_embedded_server_requires_its_password(redis_server: RedisServer) -> None:
    import redis

    assert redis_server.client().ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=redis_server.port).ping()


def test_missing_redis_server_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RedisServerError, match="apt-get install redis-server"):
        RedisServer(tmp_path, RedisServerConfig()).start()


def test_without_admission_control_a_slow_consumer_sees_stale_groups(make_buffer: object) -> None:
    # The contrast to the test above: producers that run ahead fill the buffer with old
    # versions, which the learner then has to drop.
    buffer = make_buffer(max_staleness=1, groups_per_version=2, admission_control=False)
    buffer.put([versioned_group(f"early{i}", 0) for i in range(8)], "actor-0")
    for _ in range(3):
        buffer.ack(buffer.sample(2))
        buffer.bump_version()
    assert read_stats(buffer).counters["dropped_stale"] > 0


def test_unused_admissions_are_given_back(make_buffer: object) -> None:
    buffer = make_buffer(max_staleness=0, groups_per_version=2, lease_timeout_s=1.0)
    _, leases = buffer.reserve("actor-0", 5)
    assert len(leases) == 2
    assert buffer.reserve("actor-0", 1)[1] == []
    buffer.release(leases[:1])  # the actor stopped before generating
    _, again = buffer.reserve("actor-0", 5)
    assert len(again) == 1
    time.sleep(1.2)  # both outstanding leases expire: their actor died
    assert len(buffer.reserve("actor-0", 5)[1]) == 2
    counters = read_stats(buffer).counters
    assert (counters["leases_expired"], counters["admitted"]) == (2, 2)


def test_a_dropped_group_frees_its_admission_and_is_counted(make_buffer: object) -> None:
    buffer = make_buffer(max_staleness=0, groups_per_version=2)
    _, leases = buffer.reserve("actor-0", 2)
    buffer.release(leases[:1], reason="uniform")  # generated, rewards all equal: not put
    counters = read_stats(buffer).counters
    assert (counters["dropped_uniform"], counters["admitted"]) == (1, 1)
    assert len(buffer.reserve("actor-0", 5)[1]) == 1  # its slot goes to a new group
    # Without admission control there is no lease to give back, only the count.
    free = make_buffer(admission_control=False)
    free.release(free.reserve("actor-0", 3)[1], reason="uniform")
    assert read_stats(free).counters["dropped_uniform"] == 3
    with pytest.raises(ValueError, match="unknown drop reason 'boring'; valid: uniform"):
        buffer.release(leases[1:], reason="boring")


def test_a_quarantined_group_frees_its_admission(make_buffer: object) -> None:
    buffer = make_buffer(max_staleness=0, groups_per_version=1)
    _, leases = buffer.reserve("actor-0", 1)
    buffer.put([versioned_group("doomed", 0)], "actor-0", leases)
    buffer.client.set(buffer.payload_key("doomed"), b"\x00garbage")  # corrupted at rest
    assert buffer.reserve("actor-0", 1)[1] == []  # the budget for version 0 is spent
    assert buffer.sample(1, timeout_s=0.2).groups == []  # quarantined, never trained...
    _, leases = buffer.reserve("actor-0", 1)  # ...so its slot comes back
    assert len(leases) == 1
    buffer.put([versioned_group("good", 0)], "actor-0", leases)
    assert [g.group.group_id for g in buffer.sample(1, timeout_s=1).groups] == ["good"]


def test_open_redis_embeds_a_server_or_connects_to_a_url(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    from buffer.server import open_redis

    client, server = open_redis(None, RedisServerConfig(), tmp_path / "embedded")
    try:
        assert client.ping()
        assert (
            tmp_path / "embedded" / "redis.conf"
        ).stat().st_mode & 0o077 == 0  # holds the password
    finally:
        server.stop()
    assert server.process.poll() is not None, "stopped: no orphan redis-server"
    client, none = open_redis(redis_server.url, RedisServerConfig(), tmp_path)
    assert none is None
    assert client.ping()
    with pytest.raises(RedisServerError, match="cannot reach the buffer"):
        open_redis("redis://127.0.0.1:1/0", RedisServerConfig(), tmp_path)
    with pytest.raises(RedisServerError, match="must start with redis://"):
        open_redis("http://example", RedisServerConfig(), tmp_path)


def test_sample_can_ack_the_previous_batch_in_the_same_round_trip(make_buffer: object) -> None:
    buffer = make_buffer()
    buffer.put([versioned_group(f"g{i}", 0) for i in range(4)], "actor-0")
    first = buffer.sample(2)
    second = buffer.sample(2, ack=first)
    assert sorted(second.previous_ack.acked_ids) == sorted(first.entry_ids)
    assert not set(first.entry_ids) & set(second.entry_ids)
    assert buffer.ack(second).acked == 2
    assert read_stats(buffer).counters["acked"] == 4


def test_scripts_are_reloaded_when_redis_forgets_them(make_buffer: object) -> None:
    buffer = make_buffer()
    buffer.client.script_flush()  # what a restart without the script cache looks like
    assert buffer.put([versioned_group("a", 0)], "actor-0").stored == 1
    buffer.client.script_flush()
    assert buffer.ack(buffer.sample(1)).acked == 1


def test_rates_between_two_snapshots(make_buffer: object) -> None:
    buffer = make_buffer()
    before = read_stats(buffer)
    assert before.rates == {}
    buffer.put([versioned_group(f"g{i}", 0, tokens=5) for i in range(6)], "actor-0")
    buffer.ack(buffer.sample(4))
    time.sleep(0.2)
    after = read_stats(buffer, previous=before)
    elapsed = after.taken_at - before.taken_at
    assert elapsed >= 0.2
    # 6 puts, 4 sampled, 4 acked and 6 x 2 x 5 = 60 tokens over `elapsed` seconds.
    assert after.rates["put_per_s"] == pytest.approx(6 / elapsed)
    assert after.rates["sampled_per_s"] == pytest.approx(4 / elapsed)
    assert after.rates["acked_per_s"] == pytest.approx(4 / elapsed)
    assert after.rates["put_tokens_per_s"] == pytest.approx(60 / elapsed)
    assert after.metrics()["buffer/acked_per_s"] == pytest.approx(4 / elapsed)


def test_sample_reads_payloads_in_the_claiming_round_trip_and_leaves_no_list(
    make_buffer: object,
) -> None:
    buffer = make_buffer()
    buffer.put([versioned_group(f"g{i}", 0) for i in range(3)], "actor-0")
    batch = buffer.sample(3)
    assert sorted(g.group.group_id for g in batch.groups) == ["g0", "g1", "g2"]
    prefix = buffer.config.key_prefix
    assert buffer.client.keys(f"{prefix}:listed:*") == []
    # A client whose connection dropped between the claim and its SORT leaves the list
    # behind: it expires with the claims' visibility timeout.
    buffer.ack(batch)
    buffer.put([versioned_group("late", 0)], "actor-0")
    listed = f"{prefix}:listed:orphan"
    timeout_ms = int(buffer.config.visibility_timeout_s * 1000)
    buffer._run("sample", 1, 1, buffer.config.max_staleness, timeout_ms, "orphan", "", listed, 0)
    assert buffer.client.lrange(listed, 0, -1) == [b"late"]
    assert 0 < buffer.client.pttl(listed) <= timeout_ms


def test_put_quarantines_poison_with_its_reason_and_stores_the_rest(make_buffer: object) -> None:
    # Each would crash or poison the learner: NaN on an environment token, a token id the
    # model has no embedding for, a sequence longer than the engine takes.
    buffer = make_buffer(max_staleness=0, groups_per_version=5, vocab_size=100,
                         max_sequence_tokens=12)  # fmt: skip
    _, leases = buffer.reserve("actor-0", 5)
    nan_logprobs = np.array([-0.5, np.nan, -0.5, -0.5], np.float32)
    env_token = np.array([True, False, True, True])
    poison = {
        "nan-env": make_group(make_completion(behaviour_logprobs=nan_logprobs,
                                              loss_mask=env_token), group_id="nan-env"),
        "vocab": make_group(make_completion(token_ids=np.array([1, 2, 100, 3], np.int32)),
                            group_id="vocab"),
        "long": make_group(make_completion(10), group_id="long"),  # 3 + 10 tokens
    }  # fmt: skip
    groups = [versioned_group("good-0", 0), *poison.values(), versioned_group("good-1", 0)]
    result = buffer.put(groups, "actor-0", leases)
    assert (result.stored, result.duplicates) == (2, 0)
    reasons = dict(result.refused)
    assert list(reasons) == ["nan-env", "vocab", "long"]
    assert "behaviour_logprobs has NaN or inf" in reasons["nan-env"]
    assert "token id 100 is outside the model's vocabulary (100 ids)" in reasons["vocab"]
    assert "prompt + completion is 13 tokens, over the engine's 12" in reasons["long"]
    assert {r.entry_id: r.reason for r in buffer.quarantined()} == reasons
    stats = read_stats(buffer)
    assert stats.counters["quarantined"] == 3 and stats.depth == 2
    # The refused groups' admissions are free again: three more may be generated.
    assert len(buffer.reserve("actor-0", 5)[1]) == 3
    assert sorted(g.group.group_id for g in buffer.sample(2).groups) == ["good-0", "good-1"]


def test_a_restarted_producer_releases_its_predecessors_leases(make_buffer: object) -> None:
    buffer = make_buffer(groups_per_version=5, max_staleness=0)
    _, leases = buffer.reserve("actor-1", 4)  # then actor-1 dies, holding them
    assert len(leases) == 4
    assert len(buffer.reserve("actor-10", 1)[1]) == 1  # "actor-1" is a prefix of its name
    assert buffer.reserve("actor-2", 4)[1] == []  # admission is full until they time out
    assert buffer.release_producer("actor-1") == 4  # its replacement starts
    assert buffer.release_producer("actor-1") == 0
    assert len(buffer.reserve("actor-2", 4)[1]) == 4
