"""`relay actor --buffer redis://...`: a process outside any Ray cluster joins an experiment
with a credential of its own (`relay actor-credential create`).

The test plays the learner: it describes the experiment in a real redis-server and
publishes weights; the actor gets everything else from there (config, tokenizer, weights).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from buffer.gate import Gate
from buffer.replay_buffer import ReplayBuffer
from buffer.telemetry import Telemetry
from relay.config import load_config
from relay.experiment import publish_experiment
from weights.redis_store import RedisWeightStore

pytestmark = pytest.mark.slow
RELAY = str(Path(sys.executable).parent / "relay")


def test_actor_joins_with_only_the_redis_url(
    warm_model_dir: Path, redis_server, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    prefix = "test:remote"
    config = load_config(None, [
        f"model.path={warm_model_dir}", f"buffer.key_prefix={prefix}",
        "buffer.admission_control=false", "engine.max_model_len=128",
        "actors.group_size=4", "actors.groups_in_flight=2", "actors.sampling.max_tokens=8",
    ])  # fmt: skip
    client = redis_server.client()
    publish_experiment(client, config, run_id="remote-run")
    model = AutoModelForCausalLM.from_pretrained(warm_model_dir, dtype=torch.float32)
    buffer = ReplayBuffer(client, config.buffer)
    buffer.set_version(3)
    RedisWeightStore(client, prefix).publish_state(3, dict(model.named_parameters()))

    gate = Gate(buffer).start()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # The learner's own URL is refused: actors join with a credential of their own.
    refused = subprocess.run(
        [RELAY, "actor", "--buffer", redis_server.url, "--prefix", prefix],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0 and "not an actor credential" in refused.stderr
    assert "Traceback" not in refused.stderr
    issued = subprocess.run(
        [RELAY, "actor-credential", "create", "pool-b", "--buffer", redis_server.url,
         "--prefix", prefix],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    url = issued.stdout.strip().splitlines()[-1]
    assert url.startswith("redis://test%3Aremote.pool-b:") and redis_server.password not in url
    actor = subprocess.Popen(
        [RELAY, "actor", "--buffer", url, "--prefix", prefix,
         "--env", "arithmetic", "--actor-id", "remote-0", "--cache", str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while int(client.hget(buffer.key("counters"), "put") or 0) < 3:
        if actor.poll() is not None:
            pytest.fail(f"relay actor exited:\n{actor.stdout.read()}")
        assert time.monotonic() < deadline, "no groups from the remote actor"
        time.sleep(0.2)
    actor.send_signal(signal.SIGTERM)
    out, _ = actor.communicate(timeout=120)
    assert actor.returncode == 0, out
    assert "remote-0:" in out and "groups" in out

    batch = buffer.sample(3)
    for sampled in batch.groups:
        group = sampled.group
        assert group.actor_id == "pool-b/remote-0" and group.run_id == "remote-run"
        assert all(set(c.policy_versions.per_token()) == {3} for c in group.completions)
    gate.stop()
    health = Telemetry.beside(buffer).health()["pool-b/remote-0"]
    assert health["version"] == 3 and health["groups"] >= 3
    # The local copy of the policy was written from Redis alone.
    assert (tmp_path / "test_remote" / "model" / "model.safetensors").is_file()
