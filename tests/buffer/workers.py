"""Producer and consumer processes for the concurrency tests (spawned, so kept light)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import redis

from buffer.config import BufferConfig
from buffer.replay_buffer import ReplayBuffer
from tests.buffer.factories import versioned_group


def produce(url: str, prefix: str, producer: int, n_groups: int) -> None:
    """Put `n_groups` groups, re-putting some as a producer retrying after a lost reply would."""
    buffer = ReplayBuffer(redis.Redis.from_url(url), BufferConfig(key_prefix=prefix))
    rng = random.Random(producer)
    ids = [f"p{producer}-{i}" for i in range(n_groups)]
    for start in range(0, n_groups, 5):
        groups = [versioned_group(i, version=0) for i in ids[start : start + 5]]
        buffer.put(groups, f"producer-{producer}")
        if rng.random() < 0.3:
            buffer.put(groups, f"producer-{producer}")  # a retry: must not duplicate


def consume(
    url: str, prefix: str, visibility_s: float, crash_probability: float, log: str, seed: int
) -> None:
    """Sample, then either crash before acking (exit without a word) or ack and log the ids.

    No delivery limit: by chance a group can meet more crashes than buffer.max_deliveries,
    and this worker tests redelivery (the limit: tests/buffer/test_held_claims.py)."""
    config = BufferConfig(key_prefix=prefix, visibility_timeout_s=visibility_s, max_deliveries=0)
    buffer = ReplayBuffer(redis.Redis.from_url(url), config)
    rng = random.Random(seed)
    with Path(log).open("a") as acked_log:
        while True:
            batch = buffer.sample(5, timeout_s=0.5)
            if not batch.groups:
                return
            if rng.random() < crash_probability:
                os._exit(3)  # a learner dying mid-step: its claims must come back
            result = buffer.ack(batch)
            for entry_id in result.acked_ids:
                acked_log.write(entry_id + "\n")
            acked_log.flush()
