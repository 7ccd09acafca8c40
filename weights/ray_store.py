"""Weights through Ray's object store: the default transport inside one Ray cluster.

The learner `ray.put`s each version's frame buffer (`weights.wire`) as one numpy array
and registers it, with the frame's layout, under the version in a small named Ray
actor. Actors ask that registry for the latest version and `ray.get` the array: on the
learner's node that maps the object store's shared memory (no copy), elsewhere Ray moves
it between nodes. Works on CPU and GPU alike; across clusters use the Redis store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch

from buffer.polling import poll
from weights.wire import (
    Frame,
    Layout,
    LinkStats,
    WeightsUnavailable,
    readonly_tensor,
    tensor_chunks,
)

log = logging.getLogger(__name__)


def registry_name(key_prefix: str) -> str:
    return f"relay-weights:{key_prefix}"


class _Registry:
    """Versions -> (layout, frame reference); keeps the newest `keep` versions alive."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.versions: dict[int, list] = {}

    def register(self, version: int, refs: list) -> None:
        self.versions[version] = refs
        for old in sorted(self.versions)[: -self.keep]:
            del self.versions[old]

    def latest(self) -> tuple[int, list] | None:
        if not self.versions:
            return None
        version = max(self.versions)
        return version, self.versions[version]

    def get(self, version: int) -> list | None:
        return self.versions.get(version)


def weight_registry(key_prefix: str, keep: int = 2) -> object:
    """The experiment's registry actor, created by the first caller (get_if_exists)."""
    import ray

    actor = ray.remote(num_cpus=0, max_restarts=-1)(_Registry)
    return actor.options(name=registry_name(key_prefix), get_if_exists=True).remote(keep)


class RayObjectTransport:
    """The learner's side: publish a version's frame buffer as one object."""

    name = "ray"

    def __init__(self, key_prefix: str, timeout_s: float = 300) -> None:
        self.registry = weight_registry(key_prefix)
        self.timeout_s = timeout_s

    def publish(self, frame: Frame) -> None:
        import ray

        entry = (frame.layout.to_json(), ray.put(frame.payload.numpy()))
        ray.get(self.registry.register.remote(frame.version, entry), timeout=self.timeout_s)


class RayWeightSource:
    """The actors' side: follow the registry, map the newest frame."""

    def __init__(
        self, key_prefix: str, timeout_s: float = 300, poll_s: float = 0.2, chunk_mib: float = 64
    ) -> None:
        self.registry = weight_registry(key_prefix)
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.chunk_bytes = int(chunk_mib * 1024 * 1024)
        self.held: tuple[int, Layout, object] | None = None
        """(version, layout, the frame's array in the object store) last fetched."""
        self.link = LinkStats()

    def latest_version(self) -> int | None:
        import ray

        latest = ray.get(self.registry.latest.remote(), timeout=self.timeout_s)
        return None if latest is None else latest[0]

    def wait_for_version(self, timeout_s: float) -> int | None:
        return poll(self.latest_version, timeout_s, self.poll_s)

    def fetch(self, version: int) -> int:
        import ray

        if self.held is not None and self.held[0] == version:
            return version
        entry = ray.get(self.registry.get.remote(version), timeout=self.timeout_s)
        if entry is None:
            raise WeightsUnavailable(f"weights v{version} are no longer in the Ray object store")
        started = time.perf_counter()
        layout, ref = Layout.from_json(entry[0]), entry[1]
        self.held = None  # let go of the previous frame before mapping the next
        self.held = (version, layout, ray.get(ref, timeout=self.timeout_s))
        self.link.record(version, layout.nbytes, time.perf_counter() - started, full=True)
        return version

    def chunks(self, version: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        self.fetch(version)
        _, layout, array = self.held
        return tensor_chunks(layout.tensors(readonly_tensor(array)), self.chunk_bytes)
