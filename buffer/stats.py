"""Buffer statistics for the dashboard, read without scanning stored groups.

Everything comes from counters and small hashes the Lua scripts maintain: a count of
stored groups per policy version, a histogram of sampled staleness, global counters and
one hash per producer. A `stats()` call costs O(versions + producers), not O(groups).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from buffer.credentials import credential_of
from buffer.replay_buffer import ReplayBuffer


@dataclass(frozen=True)
class ProducerStats:
    """One actor's view: what it wrote and how far behind the learner it is."""

    producer_id: str
    groups: int
    tokens: int
    last_version: int
    version_lag: int
    groups_per_s: float
    """Average rate between its first and its latest put."""
    last_put_age_s: float
    refused: int = 0
    """Groups the gate (or put) refused from it."""
    quarantined: int = 0
    """Groups of it the learner quarantined when it sampled them."""
    revoked: bool = False
    """Its credential was revoked."""


@dataclass(frozen=True)
class BufferStats:
    """A snapshot of the buffer."""

    learner_version: int
    depth: int
    """Fresh groups ready to sample (never trained on)."""
    replay_depth: int
    """Groups trained on and waiting for another use (buffer.replay > 1)."""
    claimed: int
    """Groups handed to a learner and not yet acked or offered again."""
    in_flight: int
    """Admission leases held by actors generating groups."""
    bytes: int
    staleness_histogram: dict[int, int]
    """Stored groups (ready and claimed) by staleness = learner version - oldest token version."""
    ready_staleness_histogram: dict[int, int]
    """Groups ready to sample by staleness: what the learner gets next. Claimed groups are
    left out: a learner holds trained batches until its next checkpoint."""
    sampled_staleness_histogram: dict[int, int]
    """Everything sampled so far, by staleness at sampling time."""
    sampled_uses_histogram: dict[int, int]
    """Everything sampled so far, by which use of its group it was (1: fresh, 2: the first
    replay, ...)."""
    counters: dict[str, int]
    """put, sampled, acked, reused (offered for another use), replays_expired (left
    unused past max_staleness), duplicates, dropped_stale, dropped_capacity, redelivered,
    stale_acks, quarantined, leases_granted, leases_expired, admitted, put_tokens,
    put_bytes, dropped_uniform (generated, rewards all equal, not put)."""
    producers: list[ProducerStats] = field(default_factory=list)
    rates: dict[str, float] = field(default_factory=dict)
    """put/sampled/acked groups and put tokens per second since the previous snapshot."""
    taken_at: float = 0.0
    """Redis server time (s) of the snapshot, so rates do not depend on the reader's clock."""

    def metrics(self) -> dict[str, float]:
        """Flat, namespaced figures (`buffer/depth`, `buffer/staleness_p99`, ...)."""
        out = {
            "buffer/learner_version": self.learner_version,
            "buffer/depth": self.depth,
            "buffer/replay_depth": self.replay_depth,
            "buffer/claimed": self.claimed,
            "buffer/replayed_share": self.replayed_share,
            "buffer/in_flight": self.in_flight,
            "buffer/bytes": self.bytes,
        }
        for name, histogram in (
            ("staleness", self.staleness_histogram),
            ("ready_staleness", self.ready_staleness_histogram),
            ("sampled_staleness", self.sampled_staleness_histogram),
        ):
            out[f"buffer/{name}_p50"] = percentile(histogram, 0.50)
            out[f"buffer/{name}_p99"] = percentile(histogram, 0.99)
            out[f"buffer/{name}_max"] = max(histogram, default=0)
        out.update({f"buffer/{name}": value for name, value in self.counters.items()})
        out.update({f"buffer/{name}": value for name, value in self.rates.items()})
        return out

    @property
    def replayed_share(self) -> float:
        """The share of everything sampled that was a replay (a group's second use or later)."""
        total = sum(self.sampled_uses_histogram.values())
        return 1.0 - self.sampled_uses_histogram.get(1, 0) / total if total else 0.0


COUNTER_NAMES = (
    "put", "sampled", "acked", "reused", "replays_expired", "duplicates", "dropped_stale",
    "dropped_capacity",
    "redelivered", "stale_acks", "quarantined", "leases_granted", "leases_expired",
    "admitted", "put_tokens", "put_bytes", "dropped_uniform", "spot_checked",
    "spot_check_failed",
)  # fmt: skip


_RATES = {
    "put_per_s": "put",
    "sampled_per_s": "sampled",
    "acked_per_s": "acked",
    "put_tokens_per_s": "put_tokens",
}


def read_stats(buffer: ReplayBuffer, previous: BufferStats | None = None) -> BufferStats:
    """Read a snapshot in two round trips; with `previous`, rates over the time between them."""
    client = buffer.client
    pipe = client.pipeline(transaction=True)
    pipe.get(buffer.key("version"))
    pipe.hgetall(buffer.key("counters"))
    pipe.hgetall(buffer.key("vcount"))
    pipe.hgetall(buffer.key("sampled_staleness"))
    pipe.hgetall(buffer.key("sampled_uses"))
    pipe.zcard(buffer.key("ready"))
    pipe.zcard(buffer.key("replay"))
    pipe.zcard(buffer.key("live"))  # stored groups: ready ones and claimed ones
    pipe.zcard(buffer.key("leases"))
    pipe.smembers(buffer.key("producers"))
    pipe.zrange(buffer.key("ready"), 0, 0, withscores=True)
    pipe.smembers(buffer.keyspace.revoked)
    pipe.time()
    (version, counters, vcount, sampled, uses, depth, replay_depth, stored, leases,
     producer_ids, oldest, revoked, now) = pipe.execute()  # fmt: skip
    revoked = {name.decode() for name in revoked}
    version = int(version or 0)
    now_s = now[0] + now[1] / 1e6
    counters = {k.decode(): int(v) for k, v in counters.items()}
    staleness: dict[int, int] = {}
    for stored_version, count in vcount.items():
        lag = version - int(float(stored_version))
        staleness[lag] = staleness.get(lag, 0) + int(count)
    ids = sorted(p.decode() for p in producer_ids)
    pipe = client.pipeline(transaction=False)
    for producer in ids:
        pipe.hgetall(buffer.keyspace.producer(producer))
    # Ready groups are scored by their oldest token version: one ZCOUNT per version seen.
    buckets = _ready_buckets(oldest, version)
    for _, low, high in buckets:
        pipe.zcount(buffer.key("ready"), low, high)
    replies = pipe.execute()
    producers = [
        _producer(pid, raw, version, now_s, credential_of(pid) in revoked)
        for pid, raw in zip(ids, replies[: len(ids)], strict=True)
    ]
    ready_staleness = {
        staleness: int(n)
        for (staleness, _, _), n in zip(buckets, replies[len(ids) :], strict=True)
        if int(n)
    }
    counters_now = {name: counters.get(name, 0) for name in COUNTER_NAMES}
    rates = {}
    if previous is not None and now_s > previous.taken_at:
        elapsed = now_s - previous.taken_at
        rates = {
            rate: (counters_now[name] - previous.counters.get(name, 0)) / elapsed
            for rate, name in _RATES.items()
        }
    return BufferStats(
        learner_version=version,
        depth=int(depth),
        replay_depth=int(replay_depth),
        # Claims are recorded per batch, not per group; a released replay may still be
        # claimed until its checkpoint, so this counts it once, as waiting.
        claimed=int(stored) - int(depth) - int(replay_depth),
        in_flight=int(leases),
        bytes=counters.get("bytes", 0),
        staleness_histogram=dict(sorted(staleness.items())),
        ready_staleness_histogram=dict(sorted(ready_staleness.items())),
        sampled_staleness_histogram=dict(sorted((int(k), int(v)) for k, v in sampled.items())),
        sampled_uses_histogram=dict(sorted((int(k), int(v)) for k, v in uses.items())),
        counters=counters_now,
        producers=producers,
        rates=rates,
        taken_at=now_s,
    )


_READY_VERSIONS = 256
"""Ready groups older than this many versions are counted at the oldest one's staleness."""


def _ready_buckets(oldest: list[tuple[bytes, float]], version: int) -> list[tuple[int, str, str]]:
    """(staleness, lowest score, highest score) ZCOUNT ranges that cover every ready group."""
    if not oldest:
        return []
    first = min(int(oldest[0][1]), version)
    start = max(first, version - _READY_VERSIONS + 1)
    return [
        (
            version - (first if v == start else v),
            "-inf" if v == start else str(v),
            "+inf" if v == version else str(v),
        )
        for v in range(start, version + 1)
    ]


def _producer(
    producer_id: str, raw: dict[bytes, bytes], version: int, now_s: float, revoked: bool
) -> ProducerStats:
    fields = {k.decode(): int(float(v)) for k, v in raw.items()}
    first, last = fields.get("first_put_ms", 0) / 1000, fields.get("last_put_ms", 0) / 1000
    groups = fields.get("groups", 0)
    return ProducerStats(
        producer_id=producer_id,
        groups=groups,
        tokens=fields.get("tokens", 0),
        last_version=fields.get("last_version", 0),
        version_lag=version - fields.get("last_version", 0),
        groups_per_s=(groups - 1) / (last - first) if last > first else 0.0,
        last_put_age_s=max(0.0, now_s - last),
        refused=fields.get("refused", 0),
        quarantined=fields.get("quarantined", 0),
        revoked=revoked,
    )


def percentile(histogram: dict[int, int], q: float) -> int:
    """The smallest value with at least a fraction `q` of the counts at or below it."""
    total = sum(histogram.values())
    if total == 0:
        return 0
    running = 0
    for value in sorted(histogram):
        running += histogram[value]
        if running >= q * total:
            return value
    return max(histogram)
