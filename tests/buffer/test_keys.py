"""Every key an experiment writes is one that buffer/keys.py names (real redis-server)."""

from __future__ import annotations

import fnmatch

import torch

from buffer.keys import SCRIPT_KEYS, Keyspace
from buffer.telemetry import Telemetry
from tests.buffer.factories import versioned_group
from weights.redis_store import RedisWeightStore


def known_patterns(keys: Keyspace) -> list[str]:
    """Every name the keyspace gives, with `*` where an id or version goes."""
    return [
        *keys.script_keys, keys.payload("*"), keys.producer("*"), keys.listed("*"),
        f"{keys.of('requests')}:*", keys.health, keys.metrics("*"), keys.restarts,
        keys.experiment, keys.experiment_files, keys.weights_latest, keys.weights_versions,
        keys.weights_manifest("*"), keys.weights_part("*", "*", "*"),  # type: ignore[arg-type]
    ]  # fmt: skip


def test_everything_an_experiment_writes_is_named_by_its_keyspace(make_buffer) -> None:
    buffer = make_buffer(visibility_timeout_s=60, replay=2)
    telemetry = Telemetry.beside(buffer)
    prefix = buffer.config.key_prefix
    store = RedisWeightStore(buffer.client, prefix, keep_versions=1, keep_deltas=1)
    buffer.fence_out_older_learners()
    version, leases = buffer.reserve("actor-0", 3)
    buffer.put([versioned_group(f"g{i}", version) for i in range(3)], "actor-0", leases)
    batch = buffer.sample(2, hold_as="learner-0")
    buffer.offer_replays(batch)
    buffer.commit("learner-0", [batch])
    buffer.ack(buffer.sample(2))  # a fresh group and a replay
    buffer.quarantine(buffer.sample(1), "a test")
    for v in (1, 2):
        store.publish_state(v, {"w": torch.full((2,), float(v))})
        buffer.set_version(v)
    telemetry.set_health("actor-0", {"groups": 3})
    telemetry.record_metrics("learner", {"step": 1})
    telemetry.count_restart("actor-0")
    telemetry.describe({"run_id": "r", "at": 1.0}, {"config.json": b"{}"})

    written = sorted(k.decode() for k in buffer.client.keys(f"{buffer.config.key_prefix}:*"))
    patterns = known_patterns(buffer.keyspace)
    unnamed = [k for k in written if not any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    assert written and unnamed == []
    # The old weight version's keys are gone; each script key is one of the scripts' KEYS.
    assert not any(k.startswith(f"{buffer.config.key_prefix}:weights:1:") for k in written)
    assert [k.rsplit(":", 1)[1] for k in buffer.keyspace.script_keys] == list(SCRIPT_KEYS)
