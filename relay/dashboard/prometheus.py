"""The dashboard's figures in Prometheus' text format (`/metrics`), under `relay_*` names.

The staleness of the groups ready to sample is a gauge histogram (what is there now); the
staleness of what the learner sampled is a cumulative histogram. Both use fixed buckets,
so that series stay comparable over a run and across runs.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 64)

_BUFFER_GAUGES = {
    "learner_version": ("relay_learner_version", "policy version the learner last published"),
    "depth": ("relay_buffer_depth_groups", "fresh groups ready to sample"),
    "replay_depth": ("relay_buffer_replay_groups", "trained groups waiting for another use"),
    "replayed_share": ("relay_buffer_replayed_share", "share of sampled groups that were replays"),
    "claimed": ("relay_buffer_claimed_groups", "groups sampled and not yet acked"),
    "in_flight": ("relay_buffer_in_flight_groups", "admission leases held by actors"),
    "bytes": ("relay_buffer_bytes", "encoded bytes stored"),
}
_ACTOR_GAUGES = {
    "version": "policy version the actor generates with",
    "version_lag": "learner version minus the actor's",
    "tokens_per_s": "generated tokens per second since the actor started",
    "groups_per_s": "groups per second since the actor started",
    "idle_fraction": "fraction of time the engine had nothing to run",
    "in_flight_groups": "groups being generated",
    "weight_bytes_per_s": "bytes per second of the actor's weight fetches (its link)",
    "last_weight_fetch_s": "seconds the actor's last weight fetch took",
    "health_age_s": "seconds since the actor's last health report",
    "revoked": "1 when the actor's credential was revoked",
}
_ACTOR_COUNTERS = {
    "restarts": "times the actor was restarted",
    "errors": "errors the actor recovered from",
    "weight_loads": "weight versions loaded",
    "groups_put": "groups put into the buffer",
    "refused": "groups of the actor refused at put (by the gate)",
    "quarantined": "groups of the actor quarantined when sampled",
}
_LEARNER_GAUGES = {
    "step": "learner steps done",
    "reward_mean": "mean reward of the last trained batch",
    "accuracy": "last held-out greedy accuracy",
    "idle_fraction": "fraction of recent step time spent waiting for rollouts",
    "is_weight_mean": "mean importance weight of the last batch",
    "is_weight_max": "largest importance weight of the last batch",
    "is_ess": "effective sample size of the importance weights, as a fraction",
    "clip_fraction": "fraction of tokens whose ratio was clipped",
    "staleness_mean": "mean staleness of the last trained batch",
    "replayed_fraction": "share of the last trained batch that were replays",
}


def exposition(snapshot: dict) -> bytes:
    """`snapshot` (from `Watcher.poll`) as Prometheus text format 0.0.4."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry)


class _SnapshotCollector:
    def __init__(self, snapshot: dict) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        yield from _buffer_metrics(self.snapshot["buffer"])
        yield from _actor_metrics(self.snapshot["actors"])
        yield from _learner_metrics(self.snapshot["learner"])


def _buffer_metrics(buffer: dict) -> Iterator[Metric]:
    for field, (name, help_text) in _BUFFER_GAUGES.items():
        yield GaugeMetricFamily(name, help_text, value=buffer[field])
    ready = buffer["staleness"]["counts"]
    yield GaugeHistogramMetricFamily(
        "relay_buffer_staleness",
        "groups ready to sample by staleness (learner version - oldest token version)",
        buckets=_buckets(ready),
        gsum_value=sum(s * n for s, n in ready),
    )
    sampled = buffer["sampled_staleness"]["counts"]
    yield HistogramMetricFamily(
        "relay_buffer_sampled_staleness",
        "groups the learner sampled, by staleness when sampled",
        buckets=_buckets(sampled),
        sum_value=sum(s * n for s, n in sampled),
    )
    for name, value in buffer["counters"].items():
        yield CounterMetricFamily(f"relay_buffer_{name}", f"buffer counter {name}", value=value)


def _buckets(counts: list[list[int]]) -> list[tuple[str, float]]:
    total = sum(n for _, n in counts)
    return [
        (str(bound), float(sum(n for s, n in counts if s <= bound))) for bound in STALENESS_BUCKETS
    ] + [("+Inf", float(total))]


def _actor_metrics(actors: list[dict]) -> Iterator[Metric]:
    families = {
        field: GaugeMetricFamily(f"relay_actor_{field}", help_text, labels=["actor"])
        for field, help_text in _ACTOR_GAUGES.items()
    }
    families |= {
        field: CounterMetricFamily(f"relay_actor_{field}", help_text, labels=["actor"])
        for field, help_text in _ACTOR_COUNTERS.items()
    }
    for row in actors:
        for field, family in families.items():
            if row.get(field) is not None:
                family.add_metric([row["actor_id"]], float(row[field]))
    yield from families.values()


def _learner_metrics(learner: dict) -> Iterator[Metric]:
    if learner.get("step") is None:
        return
    for field, help_text in _LEARNER_GAUGES.items():
        if learner.get(field) is not None:
            yield GaugeMetricFamily(f"relay_learner_{field}", help_text, value=learner[field])
    split = GaugeMetricFamily(
        "relay_learner_step_seconds",
        "mean seconds per step over recent steps, by phase",
        labels=["phase"],
    )
    for phase, seconds in learner["time_split"].items():
        split.add_metric([phase.removesuffix("_s")], seconds)
    yield split
