"""What the dashboard, `/metrics` and `relay status` show, read from a run's Redis.

Everything comes from the buffer: its statistics (`buffer.stats.read_stats`), the actors'
health records and the learner's per-step metrics (`buffer.telemetry.Telemetry`). A
`Watcher` polls them, keeps the recent history of buffer depth (which Redis does not
store) and merges new learner records in, so that a poll reads O(versions + actors +
new steps), never the stored groups.
"""

from __future__ import annotations

import threading
from collections import deque

from buffer.replay_buffer import ReplayBuffer
from buffer.stats import BufferStats, percentile, read_stats
from buffer.telemetry import Telemetry

LEARNER_FIELDS = {
    "reward_mean": "learner/reward_mean",
    "accuracy": "eval/greedy_accuracy",
    "wait_s": "learner/wait_s",
    "compute_s": "learner/step_s",
    "publish_s": "learner/publish_block_s",
    "is_weight_mean": "learner/is_weight_mean",
    "is_weight_max": "learner/is_weight_max",
    "is_ess": "learner/is_ess",
    "clip_fraction": "learner/clip_fraction",
    "staleness_mean": "learner/staleness_mean",
    "staleness_max": "learner/staleness_max",
    "loss": "learner/loss",
    "tokens": "learner/tokens",
    "replayed_fraction": "learner/replayed_fraction",
}
"""A learner step's record on the dashboard, by the name the learner logs it under."""

IDLE_WINDOW_STEPS = 50
"""Learner idle fraction and time split are averaged over this many recent steps."""

ACTOR_SILENT_S = 30.0
"""An actor whose health record is older than this is shown as silent."""


class Watcher:
    """Polls one experiment's buffer; `poll()` returns the snapshot the views render.

    Safe to share between threads: one polls, others render snapshots.
    """

    def __init__(
        self, buffer: ReplayBuffer, series_points: int = 1800, history_steps: int = 5000
    ) -> None:
        self.buffer = buffer
        self.telemetry = Telemetry.beside(buffer)
        self.series: deque[dict] = deque(maxlen=series_points)
        self.history: deque[dict] = deque(maxlen=history_steps)
        self._lock = threading.Lock()
        self._stats: BufferStats | None = None
        self._actors: list[dict] = []

    def poll(self) -> dict:
        """Read the buffer once and return the current snapshot (history included)."""
        self.read()
        return self.snapshot()

    def read(self) -> None:
        """Read the buffer once; `snapshot()` renders what was read."""
        stats = read_stats(self.buffer, self._stats)
        health = self.telemetry.health()
        # Only the tail is read once the history is known: the learner writes a record
        # per step and a poll every few seconds sees a handful of new ones.
        last = 200 if self.history else self.history.maxlen
        records = self.telemetry.metrics_history("learner", last=last)
        with self._lock:
            self._stats = stats
            self._actors = _actor_rows(health, stats)
            self.series.append(
                {
                    "t": stats.taken_at,
                    "depth": stats.depth,
                    "claimed": stats.claimed,
                    "in_flight": stats.in_flight,
                    "bytes": stats.bytes,
                }
            )
            newest = self.history[-1]["time"] if self.history else float("-inf")
            self.history.extend(
                _learner_record(r) for r in records if float(r.get("time", 0.0)) > newest
            )

    def snapshot(self, history_since: float | None = None) -> dict:
        """The last poll's figures; learner history after `history_since` (None: all)."""
        with self._lock:
            if self._stats is None:
                raise RuntimeError("read() first")
            stats = self._stats
            history = list(self.history)
            series = list(self.series) if history_since is None else [self.series[-1]]
            actors = list(self._actors)
        return {
            "prefix": self.buffer.config.key_prefix,
            "taken_at": stats.taken_at,
            "buffer": _buffer_figures(stats),
            "series": series,
            "actors": actors,
            "learner": _learner_figures(history, stats.taken_at),
            "learner_history": [
                r for r in history if history_since is None or r["time"] > history_since
            ],
        }


def _buffer_figures(stats: BufferStats) -> dict:
    counters = stats.counters
    return {
        "learner_version": stats.learner_version,
        "depth": stats.depth,
        "replay_depth": stats.replay_depth,
        "claimed": stats.claimed,
        "in_flight": stats.in_flight,
        "bytes": stats.bytes,
        "staleness": _histogram_figures(stats.ready_staleness_histogram),
        "sampled_staleness": _histogram_figures(stats.sampled_staleness_histogram),
        "uses": _histogram_figures(stats.sampled_uses_histogram),
        "replayed_share": stats.replayed_share,
        "counters": counters,
        "lost_work": {
            "dropped_stale": counters["dropped_stale"],
            "dropped_capacity": counters["dropped_capacity"],
            "dropped_uniform": counters["dropped_uniform"],
            "claims_expired": counters["redelivered"],
            "leases_expired": counters["leases_expired"],
            "quarantined": counters["quarantined"],
            "replays_expired": counters["replays_expired"],
        },
        "rates": stats.rates,
    }


def _histogram_figures(histogram: dict[int, int]) -> dict:
    return {
        "counts": [[staleness, count] for staleness, count in sorted(histogram.items())],
        "total": sum(histogram.values()),
        "p50": percentile(histogram, 0.50),
        "p99": percentile(histogram, 0.99),
        "max": max(histogram, default=0),
    }


def _actor_rows(health: dict[str, dict], stats: BufferStats) -> list[dict]:
    """One row per actor: its own health record joined with what the buffer saw it put."""
    producers = {p.producer_id: p for p in stats.producers}
    rows = []
    for actor_id in sorted(set(health) | set(producers)):
        record = health.get(actor_id, {})
        producer = producers.get(actor_id)
        updated_at = record.get("updated_at")
        age = None if updated_at is None else max(0.0, stats.taken_at - updated_at)
        rows.append(
            {
                "actor_id": actor_id,
                "version": record.get("version", producer.last_version if producer else None),
                "version_lag": record.get(
                    "version_lag", producer.version_lag if producer else None
                ),
                "tokens_per_s": record.get("tokens_per_s"),
                "groups_per_s": record.get(
                    "groups_per_s", producer.groups_per_s if producer else None
                ),
                "idle_fraction": record.get("idle_fraction"),
                "in_flight_groups": record.get("in_flight_groups"),
                "weight_loads": record.get("weight_loads"),
                # Its link to the weight store: bytes/s over all fetches, the last fetch.
                "weight_bytes_per_s": record.get("weight_bytes_per_s"),
                "last_weight_fetch_s": record.get("last_weight_fetch_s"),
                "weight_wait_s": record.get("weight_wait_s"),
                "restarts": record.get("restarts", 0),
                "errors": record.get("errors", 0),
                "last_error": record.get("last_error") or "",
                "groups_put": producer.groups if producer else 0,
                "refused": producer.refused if producer else 0,
                "quarantined": producer.quarantined if producer else 0,
                "revoked": producer.revoked if producer else False,
                "last_put_age_s": producer.last_put_age_s if producer else None,
                "health_age_s": age,
                "silent": age is None or age > ACTOR_SILENT_S,
            }
        )
    return rows


def _learner_record(record: dict) -> dict:
    out = {
        "step": record.get("step"),
        "version": record.get("version"),
        "time": float(record.get("time", 0.0)),
    }
    for name, key in LEARNER_FIELDS.items():
        if key in record:
            out[name] = record[key]
    return out


def _learner_figures(history: list[dict], now: float) -> dict:
    """The latest step, the last held-out accuracy, and where the learner's time went."""
    if not history:
        return {"step": None}
    latest = history[-1]
    recent = history[-IDLE_WINDOW_STEPS:]
    split = {name: sum(r.get(name, 0.0) for r in recent) / len(recent)
             for name in ("wait_s", "compute_s", "publish_s")}  # fmt: skip
    busy = sum(split.values())
    accuracy = next((r for r in reversed(history) if "accuracy" in r), None)
    return {
        **latest,
        "time_split": split,
        "idle_fraction": split["wait_s"] / busy if busy > 0 else 0.0,
        "accuracy": None if accuracy is None else accuracy["accuracy"],
        "accuracy_step": None if accuracy is None else accuracy["step"],
        "age_s": max(0.0, now - latest["time"]),
    }
