"""What an experiment tells its dashboards, apart from its rollouts: producers' health,
metrics histories, restarts and the experiment's description, in the buffer's Redis."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

import redis

from buffer.keys import Keyspace


class Telemetry:
    """An experiment's telemetry under `key_prefix`, beside (not inside) its replay buffer."""

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self.client = client
        self.keys = Keyspace(key_prefix)

    @classmethod
    def beside(cls, buffer: object) -> Telemetry:
        """The telemetry of a `ReplayBuffer`'s experiment, through the same client."""
        return cls(buffer.client, buffer.config.key_prefix)  # type: ignore[attr-defined]

    # -- producers' health ---------------------------------------------------------------
    def set_health(self, producer: str, health: dict) -> None:
        """Record a producer's latest health figures (throughput, version lag, errors)."""
        record = {**health, "updated_at": time.time()}
        self.client.hset(self.keys.health, producer, json.dumps(record))

    def health(self) -> dict[str, dict]:
        """Every producer's latest health record, by producer id."""
        raw = self.client.hgetall(self.keys.health)
        return {producer.decode(): json.loads(record) for producer, record in raw.items()}

    def count_restart(self, actor_id: str) -> int:
        """Note that `actor_id` was started again; how many times it was, so far."""
        return int(self.client.hincrby(self.keys.restarts, actor_id, 1))

    # -- metrics histories ---------------------------------------------------------------
    def record_metrics(self, source: str, metrics: dict, keep: int = 5000) -> None:
        """Append one metrics record (e.g. a learner step) to `source`'s capped history."""
        key = self.keys.metrics(source)
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(key, json.dumps(metrics))
        pipe.ltrim(key, -keep, -1)
        pipe.execute()

    def metrics_history(self, source: str, last: int = 5000) -> list[dict]:
        """The last `last` records of `source` (oldest first)."""
        raw = self.client.lrange(self.keys.metrics(source), -last, -1)
        return [json.loads(record) for record in raw]

    # -- the experiment's description ------------------------------------------------------
    def describe(self, record: Mapping[str, str | float], files: Mapping[str, bytes]) -> None:
        """Replace the experiment's description and its model files, in one transaction."""
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.experiment_files)
        if files:
            pipe.hset(self.keys.experiment_files, mapping=dict(files))
        pipe.hset(self.keys.experiment, mapping=dict(record))
        pipe.execute()

    def description(self) -> dict[bytes, bytes]:
        """The experiment's record as written by `describe`; empty before the learner wrote it."""
        return self.client.hgetall(self.keys.experiment)

    def description_files(self) -> dict[bytes, bytes]:
        """The experiment's model files by (unchecked) name."""
        return self.client.hgetall(self.keys.experiment_files)
