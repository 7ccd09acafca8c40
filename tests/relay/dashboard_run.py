"""A run with known figures, written into a real buffer, for the dashboard's tests."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from buffer.replay_buffer import ReplayBuffer
from buffer.telemetry import Telemetry
from tests.buffer.factories import versioned_group

ACTOR_HEALTH = {
    "actor-0": {
        "version": 4, "version_lag": 1, "groups": 3, "tokens": 24, "tokens_per_s": 123.4,
        "groups_per_s": 0.5, "idle_fraction": 0.25, "weight_loads": 3, "weight_load_s": 0.1,
        "in_flight_groups": 4, "restarts": 2, "errors": 1, "last_error": "engine died: boom",
        "weight_bytes_per_s": 12.5e6, "last_weight_fetch_s": 0.25,
    },
    "actor-1": {
        "version": 5, "version_lag": 0, "groups": 3, "tokens": 24, "tokens_per_s": 98.0,
        "groups_per_s": 0.4, "idle_fraction": 0.05, "weight_loads": 4, "weight_load_s": 0.1,
        "in_flight_groups": 2, "restarts": 0, "errors": 0, "last_error": "",
        "weight_bytes_per_s": 3.0e6, "last_weight_fetch_s": 1.5,
    },
}  # fmt: skip

# wait / forward-backward / publish seconds of learner steps 1-4: means 0.2 / 0.6 / 0.2,
# so the learner idles 0.2 / (0.2 + 0.6 + 0.2) = 20% of the time.
LEARNER_STEPS = [
    {"step": s, "version": s, "time": 1000.0 + s, "learner/wait_s": wait, "learner/step_s": 0.6,
     "learner/publish_block_s": 0.2, "learner/reward_mean": 0.1 * s,
     "learner/is_weight_mean": 1.0, "learner/is_weight_max": 1.5 + s, "learner/is_ess": 0.9,
     "learner/clip_fraction": 0.01}
    for s, wait in zip(range(1, 5), (0.1, 0.3, 0.1, 0.3), strict=True)
]  # fmt: skip
LEARNER_STEPS[1]["eval/greedy_accuracy"] = 0.375

READY_STALENESS = {0: 2, 1: 1}
SAMPLED_STALENESS = {1: 1, 2: 2}


def fill_known_run(buffer: ReplayBuffer) -> None:
    """Groups at versions 1, 3, 3, 4 (actor-0) and 4, 5, 5 (actor-1). At learner version 5
    with max_staleness 3, a sample of 2 drops the v1 group (staleness 4) and trains on the
    two v3 groups (staleness 2), which are acked; a sample of 1 then claims a v4 group
    (staleness 1) and keeps it. Ready: staleness {0: 2, 1: 1}; claimed: 1."""
    assert buffer.config.max_staleness == 3
    buffer.put(
        [versioned_group(g, v) for g, v in (("a", 1), ("b", 3), ("c", 3), ("g", 4))], "actor-0"
    )
    buffer.put([versioned_group(g, v) for g, v in (("d", 4), ("e", 5), ("f", 5))], "actor-1")
    buffer.set_version(5)
    batch = buffer.sample(2)
    assert sorted(s.group.group_id for s in batch.groups) == ["b", "c"]
    buffer.ack(batch)
    assert buffer.sample(1).groups[0].staleness == 1
    for actor_id, health in ACTOR_HEALTH.items():
        Telemetry.beside(buffer).set_health(actor_id, health)
    for record in LEARNER_STEPS:
        Telemetry.beside(buffer).record_metrics("learner", record)


def prometheus_samples(text: str) -> dict[tuple[str, tuple], float]:
    """`/metrics` text read with Prometheus' own parser: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
