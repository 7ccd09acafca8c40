"""Weights in the buffer's Redis: a store any actor can follow with only the buffer's URL.

`RedisWeightStore` keeps the latest policy versions
in the buffer's Redis, so an actor anywhere (another cluster included) can follow the
learner with nothing but the buffer's address. Tensors are stored in parts of at most
`part_mib`, each tensor with a SHA-256. A version becomes visible (`latest`) only once
all of it is written, and readers stream it in bounded chunks, never holding a second
full copy of the model.
"""

from __future__ import annotations

import hashlib
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
from weights.wire import PackedTensor, WeightsUnavailable, chunks, pack_state_dict, unpack_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishReport:
    """What one publish wrote."""

    version: int
    tensors: int
    bytes: int
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
        self, client: redis.Redis, key_prefix: str, *, part_mib: float = 64, keep_versions: int = 2
    ) -> None:
        if keep_versions < 1:
            raise ValueError("keep_versions must be at least 1")
        self.client = client
        self.key_prefix = key_prefix
        self.keys = Keyspace(key_prefix)
        self.epoch = ""
        """The learner epoch publishing must hold (see ReplayBuffer.fence_out_older_learners)."""
        self.part_bytes = int(part_mib * 1024 * 1024)
        self.keep_versions = keep_versions

    def publish(self, version: int, state_dict: Mapping[str, torch.Tensor]) -> PublishReport:
        """Write `state_dict` as `version`, then make it the latest and drop old versions."""
        started = time.perf_counter()
        manifest = []
        total = 0
        for name, dtype, shape, raw in pack_state_dict(state_dict):
            parts = max(1, -(-len(raw) // self.part_bytes))
            pipe = self.client.pipeline(transaction=False)
            for i in range(parts):
                part = raw[i * self.part_bytes : (i + 1) * self.part_bytes]
                pipe.hset(self.keys.weights_tensors(version), f"{name}#{i}", part)
            pipe.execute()
            digest = hashlib.sha256(raw).hexdigest()
            manifest.append(
                {"name": name, "dtype": dtype, "shape": shape, "parts": parts, "sha256": digest}
            )
            total += len(raw)
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
        report = PublishReport(version, len(manifest), total, time.perf_counter() - started)
        log.debug(
            "published weights v%d: %d tensors, %.1f MB in %.2fs",
            version,
            report.tensors,
            total / 1e6,
            report.seconds,
        )
        return report

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

    def stream(
        self, version: int, max_bytes: int = 64 * 1024 * 1024
    ) -> Iterator[list[PackedTensor]]:
        """`version`'s tensors in chunks of at most `max_bytes`, each checked against its hash."""
        raw_manifest = self.client.get(self.keys.weights_manifest(version))
        if raw_manifest is None:
            raise WeightsUnavailable(
                f"weights v{version} are not in the store (latest: {self.latest_version()})"
            )

        def tensors() -> Iterator[PackedTensor]:
            for entry in json.loads(raw_manifest):
                fields = [f"{entry['name']}#{i}" for i in range(entry["parts"])]
                parts = self.client.hmget(self.keys.weights_tensors(version), fields)
                if any(part is None for part in parts):
                    raise WeightsUnavailable(f"weights v{version} were dropped while being read")
                raw = b"".join(parts)
                if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
                    raise WeightsUnavailable(
                        f"weights v{version}: tensor {entry['name']} is corrupted"
                    )
                yield entry["name"], entry["dtype"], entry["shape"], raw

        yield from chunks(tensors(), max_bytes)

    def fetch(self, version: int) -> dict[str, torch.Tensor]:
        """A whole version as a state dict (for loading into a transformers model)."""
        return {
            name: tensor for chunk in self.stream(version) for name, tensor in unpack_tensors(chunk)
        }

    def _drop_old_versions(self) -> None:
        old = self.client.zrange(self.keys.weights_versions, 0, -self.keep_versions - 1)
        for version in (int(v) for v in old):
            self.client.delete(
                self.keys.weights_manifest(version), self.keys.weights_tensors(version)
            )
            self.client.zrem(self.keys.weights_versions, str(version))


class RedisWeightSource:
    """Follows the Redis weight store: all an actor outside the Ray cluster needs."""

    def __init__(self, store: RedisWeightStore, chunk_mib: float = 64) -> None:
        self.store = store
        self.chunk_bytes = int(chunk_mib * 1024 * 1024)

    def latest_version(self) -> int | None:
        return self.store.latest_version()

    def wait_for_version(self, timeout_s: float) -> int | None:
        return self.store.wait_for_newer(None, timeout_s)

    def chunks(self, version: int) -> Iterator[list[PackedTensor]]:
        return self.store.stream(version, self.chunk_bytes)
