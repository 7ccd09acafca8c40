"""Rollout actors in a real local Ray cluster with real vLLM engines (CPU build).

One actor follows weights through Ray's object store, writes tagged groups into a real
redis-server, survives being killed (Ray restarts it at the latest version) and stops
cleanly when asked.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from actors.config import ActorConfig
from actors.engine import EngineConfig
from actors.episodes import SamplingConfig
from actors.ray_actor import ActorSpec, start_actors
from buffer.config import BufferConfig
from buffer.credentials import Credentials, credential_url
from buffer.gate import Gate
from buffer.replay_buffer import ReplayBuffer
from buffer.telemetry import Telemetry
from envs.arithmetic import ArithmeticConfig
from weights.ray_store import RayObjectTransport
from weights.wire import FrameEncoder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[object]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2)
    yield ray
    ray.shutdown()


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_actor_generates_follows_versions_and_survives_a_kill(
    ray_cluster, warm_model_dir: Path, redis_server
) -> None:
    from transformers import AutoModelForCausalLM

    prefix = "test:ray-actors"
    buffer_config = BufferConfig(key_prefix=prefix, admission_control=False, max_staleness=100)
    buffer = ReplayBuffer(redis_server.client(), buffer_config)
    gate = Gate(buffer).start()
    password = Credentials(buffer.client, prefix).create("actor-0")
    actor_url = credential_url(redis_server.url, prefix, "actor-0", password)
    model = AutoModelForCausalLM.from_pretrained(warm_model_dir, dtype=torch.float32)
    transport = RayObjectTransport(prefix)
    transport.publish(FrameEncoder().encode(0, dict(model.named_parameters())))

    spec = ActorSpec(
        actor_id="actor-0", run_id="test", seed=1, model_path=str(warm_model_dir),
        engine=EngineConfig(max_model_len=128), env=ArithmeticConfig(),
        actor=ActorConfig(
            group_size=4, groups_in_flight=2, sampling=SamplingConfig(max_tokens=8),
            max_restarts=1, weight_poll_s=0.2, metrics_every_s=0.5,
        ),
        buffer=buffer_config.model_copy(update={"url": actor_url}),
    )  # fmt: skip
    (actor,) = start_actors([spec])
    run = actor.run.remote()

    def put() -> int:
        return int(buffer.client.hget(buffer.key("counters"), "put") or 0)

    wait_until(lambda: put() >= 2, "the first groups")
    # A new version through the object store; the running actor picks it up.
    buffer.set_version(1)
    transport.publish(FrameEncoder().encode(1, dict(model.named_parameters())))
    wait_until(
        lambda: Telemetry.beside(buffer).health().get("actor-0", {}).get("version") == 1,
        "version 1",
    )
    before_kill = put()
    wait_until(lambda: put() >= before_kill + 2, "groups at version 1")

    os.kill(ray_cluster.get(actor.pid.remote()), signal.SIGKILL)
    # Ray restarts the actor (a new process, a new engine); `run` is retried on it.
    wait_until(
        lambda: int(buffer.client.hget(f"{prefix}:restarts", "actor-0") or 0) == 1, "restart"
    )
    after_restart = put()
    wait_until(lambda: put() >= after_restart + 2, "groups after the restart")
    assert (
        Telemetry.beside(buffer).health()["actor-0"]["version"] == 1
    )  # rejoined at the latest version

    ray_cluster.get(actor.stop.remote())
    stats = ray_cluster.get(run, timeout=120)
    assert stats["groups"] >= 2

    groups = buffer.sample(put(), timeout_s=1)
    assert len(groups.groups) == put()  # every group put is whole and decodes
    versions = {int(v) for g in groups.groups for c in g.group.completions
                for v in c.policy_versions.versions}  # fmt: skip
    assert versions <= {0, 1} and 1 in versions
    assert all(g.group.actor_id == "actor-0" for g in groups.groups)
    gate.stop()
