"""Redis outages ridden out (real redis-server): restarts, pauses, resent calls, the limit."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from buffer.config import BufferConfig, RedisServerConfig
from buffer.replay_buffer import ReplayBuffer
from buffer.server import BufferUnreachable, RedisServer, connect, open_redis
from tests.buffer.factories import versioned_group


def test_every_script_resent_with_its_request_id_changes_nothing_twice(make_buffer) -> None:
    buffer = make_buffer(visibility_timeout_s=60)
    buffer.put([versioned_group(f"g{i}", 0) for i in range(4)], "actor")

    def twice(script: str, *args: object) -> tuple[object, object]:
        """The same call sent twice, as a client resends it after losing the reply."""
        keys = buffer.keyspace.script_keys
        buffer._load_scripts()
        sha = buffer._shas[script]
        first = buffer.client.evalsha(sha, len(keys), *keys, *args, "", f"request-{script}")
        return first, buffer.client.evalsha(sha, len(keys), *keys, *args, "", f"request-{script}")

    def counters() -> dict[bytes, bytes]:
        return buffer.client.hgetall(buffer.key("counters"))

    first, again = twice("reserve", 2, "actor:", 600_000, 64, 4)
    assert first == again and len(first) == 3  # the version and two leases
    assert buffer.client.zcard(buffer.key("leases")) == 2
    listed = f"{buffer.config.key_prefix}:listed:t"
    first, again = twice("sample", 2, 2, 10, 60_000, "t", "", listed, 3)
    assert first == again
    assert counters()[b"sampled"] == b"2"
    assert buffer.client.zcard(buffer.key("ready")) == 2  # not 0: claimed once
    assert buffer.client.lrange(listed, 0, -1) == first[1::3]  # listed again for SORT
    ids = first[1::3]
    first, again = twice("replay", "t", 2, 2, *ids, "1", "1")
    assert first == again == 2  # both offered for a second use, once
    assert counters()[b"reused"] == b"2"
    first, again = twice("ack", "t", 2, 2, *ids, "1", "1")
    assert first == again and first[0] == 0  # no "stale claim" on the resend
    assert counters()[b"acked"] == b"2"


def test_a_paused_server_is_ridden_out_and_the_resent_sample_claims_once(
    tmp_path: Path,
) -> None:
    with RedisServer(tmp_path / "redis", RedisServerConfig()) as server:
        client = connect(server.url, outage_limit_s=30, socket_timeout_s=0.5)
        buffer = ReplayBuffer(client, BufferConfig(key_prefix="pause"))
        buffer.put([versioned_group(f"g{i}", 0) for i in range(4)], "actor")
        buffer.sample(1)  # connected and scripts loaded before the pause
        os.kill(server.process.pid, signal.SIGSTOP)
        got: list = []
        sampler = threading.Thread(target=lambda: got.append(buffer.sample(2)))
        sampler.start()
        time.sleep(2.5)  # several socket timeouts: the call is sent again each time
        os.kill(server.process.pid, signal.SIGCONT)
        sampler.join(timeout=30)
        (batch,) = got
        assert len(batch.groups) == 2
        # Every copy of the call ran once the server woke; only the first claimed.
        counters = buffer.client.hgetall(buffer.key("counters"))
        assert counters[b"sampled"] == b"3"
        assert buffer.client.zcard(buffer.key("claimed")) == 2  # this batch and the first
        assert buffer.client.zcard(buffer.key("ready")) == 1
        assert buffer.ack(batch).acked == 2


def test_a_killed_embedded_server_is_restarted_and_no_acked_group_is_lost(
    tmp_path: Path,
) -> None:
    client, server = open_redis(None, RedisServerConfig(), tmp_path / "redis", outage_limit_s=60)
    try:
        buffer = ReplayBuffer(client, BufferConfig(key_prefix="kill", visibility_timeout_s=5))
        port = server.port
        ids = [f"g{i}" for i in range(30)]
        buffer.put([versioned_group(i, 0) for i in ids], "actor")
        acked: list[str] = []
        while len(acked) < len(ids):
            if len(acked) in (6, 18):  # twice, between and during the consumer's calls
                server.process.kill()
            batch = buffer.sample(3, timeout_s=10)
            acked += buffer.ack(batch).acked_ids
        assert Counter(acked) == Counter(ids), "each group acked exactly once"
        assert server.restarts == 2 and server.port == port
        assert buffer.sample(1).groups == []
    finally:
        server.stop()
    assert server.process.poll() is not None


def test_a_server_down_past_the_limit_is_one_error_naming_it(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", RedisServerConfig()) as server:
        buffer = ReplayBuffer(connect(server.url, outage_limit_s=1.0), BufferConfig())
        server.kill()  # not supervised: it stays down
        started = time.monotonic()
        with pytest.raises(BufferUnreachable) as raised:
            buffer.version()
    message = str(raised.value)
    assert f"127.0.0.1:{server.port}" in message and "buffer.outage_limit_s" in message
    assert server.password not in message and "--resume" in message
    assert 1.0 <= time.monotonic() - started < 10


def test_a_process_asked_to_stop_gives_up_on_a_vanished_server_within_seconds(
    tmp_path: Path,
) -> None:
    from buffer.server import shorten_outages

    with RedisServer(tmp_path / "redis", RedisServerConfig()) as server:
        client = connect(server.url, outage_limit_s=120)
        buffer = ReplayBuffer(client, BufferConfig())
        buffer.version()
        server.kill()  # the run ended and took its Redis along
        errors: list = []

        def call() -> None:
            try:
                buffer.version()
            except BufferUnreachable as error:
                errors.append(error)

        caller = threading.Thread(target=call)
        started = time.monotonic()
        caller.start()
        time.sleep(1.0)  # retrying, with two minutes to go
        shorten_outages(client, 1.0)  # SIGTERM: the already retrying call gives up too
        caller.join(timeout=30)
    assert len(errors) == 1 and time.monotonic() - started < 10
