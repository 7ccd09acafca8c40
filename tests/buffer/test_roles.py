"""Redis users per role on the embedded server: actors and the dashboard get only what
they need (real redis-server, ACL enforced by Redis)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from buffer.config import BufferConfig, RedisServerConfig
from buffer.replay_buffer import ReplayBuffer
from buffer.server import RedisServer, connect
from buffer.stats import read_stats
from buffer.telemetry import Telemetry
from tests.buffer.factories import versioned_group


def test_actors_put_and_reserve_and_the_dashboard_only_reads(tmp_path: Path) -> None:
    config = BufferConfig(key_prefix="roles", groups_per_version=8)
    with RedisServer(tmp_path / "redis", RedisServerConfig()) as server:
        learner = ReplayBuffer(server.client(), config)
        actor = ReplayBuffer(connect(server.url_for("actor")), config)
        dashboard = ReplayBuffer(connect(server.url_for("dashboard")), config)

        version, leases = actor.reserve("actor-0", 2)
        groups = [versioned_group(f"g{i}", version) for i in range(2)]
        assert actor.put(groups, "actor-0", leases).stored == 2
        Telemetry.beside(actor).set_health("actor-0", {"groups": 2})
        for forbidden in (
            actor.client.flushall, lambda: actor.client.config_get("dir"),
            lambda: actor.client.keys("*"), actor.client.shutdown,
            lambda: actor.client.execute_command("ACL", "SETUSER", "actor", "+@all"),
        ):  # fmt: skip
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()

        stats = read_stats(dashboard)
        assert (
            stats.counters["put"] == 2
            and Telemetry.beside(dashboard).health()["actor-0"]["groups"] == 2
        )
        with pytest.raises(redis.exceptions.NoPermissionError):
            dashboard.client.set("roles:version", 99)
        with pytest.raises((redis.exceptions.NoPermissionError, redis.exceptions.ExecAbortError)):
            dashboard.put([versioned_group("x", 0)], "dashboard")
        assert learner.client.exists(learner.payload_key("x")) == 0

        batch = learner.sample(2)  # the learner (default user) may do anything
        assert learner.ack(batch).acked == 2
        assert server.password not in server.url_for("actor")
