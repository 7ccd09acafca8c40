"""Redis users per role on the embedded server: the dashboard gets only what it needs
(real redis-server, ACL enforced by Redis)."""

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


def test_the_dashboard_only_reads(tmp_path: Path) -> None:
    # Actors have credentials of their own (tests/buffer/test_gate.py).
    config = BufferConfig(key_prefix="roles", groups_per_version=8)
    with RedisServer(tmp_path / "redis", RedisServerConfig()) as server:
        learner = ReplayBuffer(server.client(), config)
        dashboard = ReplayBuffer(connect(server.url_for("dashboard")), config)
        learner.put([versioned_group(f"g{i}", 0) for i in range(2)], "actor-0")
        Telemetry.beside(learner).set_health("actor-0", {"groups": 2})

        stats = read_stats(dashboard)
        assert (
            stats.counters["put"] == 2
            and Telemetry.beside(dashboard).health()["actor-0"]["groups"] == 2
        )
        for forbidden in (
            lambda: dashboard.client.set("roles:version", 99),
            dashboard.client.flushall,
            lambda: dashboard.client.config_get("dir"),
        ):  # fmt: skip
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()
        with pytest.raises((redis.exceptions.NoPermissionError, redis.exceptions.ExecAbortError)):
            dashboard.put([versioned_group("x", 0)], "dashboard")
        assert learner.client.exists(learner.payload_key("x")) == 0

        batch = learner.sample(2)  # the learner (default user) may do anything
        assert learner.ack(batch).acked == 2
        assert server.password not in server.url_for("dashboard")
