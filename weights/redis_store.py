"""Weights in the buffer's Redis: a store any actor can follow with only the buffer's URL.

Each version is a frame (`weights.wire`): its full buffer, cut into parts of `part_mib`,
and, when the learner had the previous version, a delta against it. A JSON manifest
holds the layout, the checksum of every tensor and of every part, and the delta's rows.
A version becomes visible (`latest`) only once all of it is written. The newest
`keep_versions` full frames are kept, and the manifests and deltas of the newest
`keep_deltas` versions, so an actor a few versions behind catches up through deltas.

An actor (`RedisWeightSource`) keeps its own copy of the version it runs (a `Mirror`).
It fetches a full frame when it joins, after a gap in the deltas, when the deltas would
not be smaller, and after `full_every` deltas in a row; otherwise the deltas since its
version, and checks the result against the new version's tensor checksums. Reads go a
window of parts at a time, each part checked; a dropped connection costs at most the
window in flight (redis-py reconnects and repeats that one request).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import redis
import torch

from buffer.keys import Keyspace
from buffer.polling import poll
from buffer.replay_buffer import FencedOut
from weights.wire import (
    Delta,
    Frame,
    FrameEncoder,
    Layout,
    LinkStats,
    Mirror,
    WeightsUnavailable,
    checksum,
    tensor_chunks,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishReport:
    """What one publish wrote."""

    version: int
    tensors: int
    bytes: int
    delta_bytes: int | None
    """None: no delta (first version, or not smaller than `max_delta_fraction`)."""
    seconds: float


# A version becomes visible in one step, and only while the publisher's learner epoch is
# the experiment's ('' = unfenced): a learner that a newer one replaced publishes nothing.
_MAKE_LATEST = """
if ARGV[1] ~= '' and (redis.call('GET', KEYS[4]) or '0') ~= ARGV[1] then
  return redis.error_reply('FENCED learner epoch ' .. ARGV[1] .. ' was replaced')
end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[2])
"""


class RedisWeightStore:
    """The latest policy versions, in the buffer's Redis, readable from anywhere; a
    `WeightTransport` for the publisher."""

    name = "redis"

    def __init__(
        self, client: redis.Redis, key_prefix: str, *, part_mib: float = 4,
        keep_versions: int = 2, keep_deltas: int = 16, window_mib: float = 32,
    ) -> None:  # fmt: skip
        if keep_versions < 1 or keep_deltas < keep_versions:
            raise ValueError("keep_versions must be >= 1 and keep_deltas >= keep_versions")
        self.client = client
        self.key_prefix = key_prefix
        self.keys = Keyspace(key_prefix)
        self.epoch = ""
        """The learner epoch publishing must hold (see ReplayBuffer.fence_out_older_learners)."""
        self.part_bytes = max(1, int(part_mib * 1024 * 1024))
        self.window = max(1, int(window_mib * 1024 * 1024) // self.part_bytes)
        """Parts read per request."""
        self.keep_versions = keep_versions
        self.keep_deltas = keep_deltas

    # -- the learner's side -------------------------------------------------------------------
    def publish(self, frame: Frame) -> PublishReport:
        """Write `frame` (and its delta), then make it the latest and drop old versions."""
        started = time.perf_counter()
        version = frame.version
        manifest = {
            "version": version,
            "layout": frame.layout.to_json(),
            "sums": [f"{s:016x}" for s in frame.sums],
            "part_bytes": self.part_bytes,
            "published_at": time.time(),
            "full": self._write_parts(version, "full", frame.payload),
            "delta": None,
        }
        if frame.delta is not None:
            manifest["delta"] = {
                "base": frame.delta.base,
                "rows": frame.delta.rows,
                "bytes": frame.delta.payload.numel(),
                "parts": self._write_parts(version, "delta", frame.delta.payload),
            }
        keys = [self.keys.weights_manifest(version), self.keys.weights_versions,
                self.keys.weights_latest, self.keys.of("learner_epoch")]  # fmt: skip
        try:
            self.client.eval(
                _MAKE_LATEST, len(keys), *keys, self.epoch, version, json.dumps(manifest)
            )
        except redis.ResponseError as error:
            if str(error).startswith("FENCED"):
                raise FencedOut(f"weights v{version} not published: {error}") from None
            raise
        self._drop_old_versions()
        report = PublishReport(
            version, len(frame.layout.slots), frame.layout.nbytes,
            None if frame.delta is None else frame.delta.payload.numel(),
            time.perf_counter() - started,
        )  # fmt: skip
        log.debug("published weights v%d: %.1f MB (delta %s) in %.2fs", version,
                  report.bytes / 1e6, report.delta_bytes, report.seconds)  # fmt: skip
        return report

    def publish_state(
        self, version: int, state_dict: Mapping[str, torch.Tensor],
        wire_dtype: torch.dtype | None = None,
    ) -> PublishReport:  # fmt: skip
        """Publish a state dict as a full frame (a single publish outside the learner's
        publisher: tools and tests)."""
        return self.publish(FrameEncoder(wire_dtype, deltas=False).encode(version, state_dict))

    def _write_parts(self, version: int, kind: str, payload: torch.Tensor) -> list[str]:
        """Write `payload` in parts (no copy: Redis gets views of the buffer); their sums."""
        view = memoryview(payload.numpy())
        sums, pipe, queued = [], self.client.pipeline(transaction=False), 0
        for index, start in enumerate(range(0, len(view), self.part_bytes)):
            part = view[start : start + self.part_bytes]
            pipe.set(self.keys.weights_part(version, kind, index), part)
            sums.append(f"{checksum(part):016x}")
            queued += 1
            if queued >= self.window:
                pipe.execute()
                queued = 0
        pipe.execute()
        return sums

    def _drop_old_versions(self) -> None:
        """Delete the full frames beyond the newest `keep_versions` and everything of the
        versions beyond the newest `keep_deltas`: part keys named from the manifests
        (one MGET), not searched for in the keyspace."""
        kept = [int(v) for v in self.client.zrange(self.keys.weights_versions, 0, -1)]
        old = kept[: -self.keep_versions]
        if not old:
            return
        expired = set(kept[: -self.keep_deltas])
        doomed = []
        for version, manifest in zip(old, self.manifests(old), strict=True):
            if manifest is not None:
                doomed += self._part_keys(version, "full", manifest["full"])
            if version in expired:
                delta = None if manifest is None else manifest["delta"]
                if delta is not None:
                    doomed += self._part_keys(version, "delta", delta["parts"])
                doomed.append(self.keys.weights_manifest(version))
        pipe = self.client.pipeline(transaction=False)
        for first in range(0, len(doomed), 1000):
            pipe.unlink(*doomed[first : first + 1000])
        if expired:
            pipe.zrem(self.keys.weights_versions, *map(str, expired))
        pipe.execute()

    def _part_keys(self, version: int, kind: str, sums: list[str]) -> list[str]:
        return [self.keys.weights_part(version, kind, index) for index in range(len(sums))]

    # -- reading ------------------------------------------------------------------------------
    def latest_version(self) -> int | None:
        """The newest complete version, or None before the first publish."""
        latest = self.client.get(self.keys.weights_latest)
        return int(latest) if latest is not None else None

    def wait_for_newer(self, than: int | None, timeout_s: float, poll_s: float = 0.2) -> int | None:
        """Block until a version newer than `than` is published; None on timeout."""

        def newer() -> int | None:
            latest = self.latest_version()
            return latest if latest is not None and (than is None or latest > than) else None

        return poll(newer, timeout_s, poll_s)

    def manifest(self, version: int) -> dict | None:
        return self.manifests([version])[0]

    def manifests(self, versions: list[int]) -> list[dict | None]:
        """Several versions' manifests in one round trip."""
        raws = self.client.mget([self.keys.weights_manifest(v) for v in versions])
        return [None if raw is None else json.loads(raw) for raw in raws]

    def read_full(self, version: int, mirror: Mirror, manifest: dict | None = None) -> int:
        """`version`'s full frame into `mirror`; returns the bytes read."""
        manifest = manifest or self.require_manifest(version)
        layout = Layout.from_json(manifest["layout"])
        target = mirror.reset(layout)
        self._read_parts(version, "full", manifest["full"], manifest["part_bytes"], target)
        mirror.version, mirror.deltas_since_full = version, 0
        return layout.nbytes

    def read_delta(self, version: int, mirror: Mirror, manifest: dict | None = None) -> int:
        """Apply `version`'s delta to `mirror` (which must hold its base); returns the bytes
        read. Checks every tensor it touched against `version`'s checksums."""
        manifest = manifest or self.require_manifest(version)
        delta = manifest["delta"]
        if delta is None or mirror.version != delta["base"] or mirror.layout is None:
            raise WeightsUnavailable(f"weights v{version}: no delta from v{mirror.version}")
        nbytes = delta["bytes"]
        payload = torch.empty(nbytes, dtype=torch.uint8)
        self._read_parts(version, "delta", delta["parts"], manifest["part_bytes"], payload)
        mirror.version = None  # half-applied until checked
        touched = Delta(delta["base"], delta["rows"], payload).apply(mirror.layout, mirror.payload)
        for index in touched:
            slot = mirror.layout.slots[index]
            got = checksum(mirror.payload[slot.offset : slot.offset + slot.nbytes])
            if f"{got:016x}" != manifest["sums"][index]:
                raise WeightsUnavailable(f"weights v{version}: {slot.name} differs after the delta")
        mirror.version = version
        mirror.deltas_since_full += 1
        return nbytes

    def delta_chain(self, since: int, version: int) -> list[dict] | None:
        """The manifests from `since` + 1 to `version` when each has a delta from the one
        before (one round trip); None where one is missing."""
        chain = self.manifests(list(range(since + 1, version + 1)))
        for v, manifest in enumerate(chain, start=since + 1):
            if manifest is None or manifest["delta"] is None or manifest["delta"]["base"] != v - 1:
                return None
        return chain

    def require_manifest(self, version: int) -> dict:
        manifest = self.manifest(version)
        if manifest is None:
            raise WeightsUnavailable(
                f"weights v{version} are not in the store (latest: {self.latest_version()})"
            )
        return manifest

    def _read_parts(
        self, version: int, kind: str, sums: list[str], part_bytes: int, target: torch.Tensor
    ) -> None:
        """Read parts a window at a time into `target`, checking each part's checksum."""
        out = target.numpy()
        keys = self._part_keys(version, kind, sums)
        for first in range(0, len(sums), self.window):
            indices = range(first, min(first + self.window, len(sums)))
            parts = self.client.mget(keys[first : first + self.window])
            for index, part in zip(indices, parts, strict=True):
                if part is None:
                    raise WeightsUnavailable(f"weights v{version} were dropped while being read")
                if f"{checksum(part):016x}" != sums[index]:
                    raise WeightsUnavailable(
                        f"weights v{version}: {kind} part {index} is corrupted"
                    )
                start = index * part_bytes
                out[start : start + len(part)] = memoryview(part)

    def fetch(self, version: int) -> dict[str, torch.Tensor]:
        """A whole version as a state dict of its own tensors (for a transformers model)."""
        mirror = Mirror()
        self.read_full(version, mirror)
        return mirror.tensors()


class RedisWeightSource:
    """Follows the Redis weight store: all an actor outside the Ray cluster needs."""

    def __init__(
        self, store: RedisWeightStore, chunk_mib: float = 64, full_every: int = 32
    ) -> None:
        self.store = store
        self.chunk_bytes = int(chunk_mib * 1024 * 1024)
        self.full_every = full_every
        """Fetch a full frame after this many deltas in a row (a bound on how long any
        undetected divergence could last; the checksums make one unlikely)."""
        self.mirror = Mirror()
        self.link = LinkStats()

    def latest_version(self) -> int | None:
        return self.store.latest_version()

    def wait_for_version(self, timeout_s: float) -> int | None:
        return self.store.wait_for_newer(None, timeout_s)

    def fetch(self, version: int) -> int:
        """Bring the mirror to `version`: through the deltas since the mirror's version when
        they are all kept and smaller than a full frame, else the full frame."""
        if self.mirror.version == version:
            return version
        started = time.perf_counter()
        nbytes, full, last = 0, True, None
        held = self.mirror.version
        if held is not None and held < version and self.mirror.deltas_since_full < self.full_every:
            chain = self.store.delta_chain(held, version)
            size = None if chain is None else sum(m["delta"]["bytes"] for m in chain)
            if (
                size is not None
                and self.mirror.layout is not None
                and size < self.mirror.layout.nbytes
            ):
                try:
                    for v, manifest in enumerate(chain, start=held + 1):
                        nbytes += self.store.read_delta(v, self.mirror, manifest)
                    full, last = False, chain[-1]
                except WeightsUnavailable as error:
                    log.info("delta to v%d failed (%s); fetching the full weights", version, error)
        if full:
            last = self.store.require_manifest(version)
            nbytes += self.store.read_full(version, self.mirror, last)
        self.link.record(version, nbytes, time.perf_counter() - started, full)
        self.link.last_latency_s = time.time() - last["published_at"]
        return version

    def chunks(self, version: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        self.fetch(version)
        return tensor_chunks(self.mirror.layout.tensors(self.mirror.payload), self.chunk_bytes)
