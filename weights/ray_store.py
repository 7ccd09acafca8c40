"""Weights through Ray's object store: the default transport inside one Ray cluster.

The learner `ray.put`s each chunk of the packed state dict (bounded size, so neither side
holds a second full copy) and registers the chunk references under the version in a
small named Ray actor; actors ask that registry for the latest version and `ray.get`
one chunk at a time. Works on CPU and GPU alike; across clusters use the Redis store.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

import torch

from buffer.polling import poll
from weights.wire import PackedTensor, chunks, pack_state_dict

log = logging.getLogger(__name__)


def registry_name(key_prefix: str) -> str:
    return f"relay-weights:{key_prefix}"


class _Registry:
    """Versions -> chunk references; keeps the newest `keep` versions alive."""

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
    """The learner's side: publish a version as object-store chunks."""

    name = "ray"

    def __init__(self, key_prefix: str, chunk_mib: float = 64, timeout_s: float = 300) -> None:
        self.registry = weight_registry(key_prefix)
        self.chunk_bytes = int(chunk_mib * 1024 * 1024)
        self.timeout_s = timeout_s

    def publish(self, version: int, state_dict: Mapping[str, torch.Tensor]) -> None:
        import ray

        refs = [ray.put(chunk) for chunk in chunks(pack_state_dict(state_dict), self.chunk_bytes)]
        ray.get(self.registry.register.remote(version, refs), timeout=self.timeout_s)


class RayWeightSource:
    """The actors' side: follow the registry, fetch one chunk at a time."""

    def __init__(self, key_prefix: str, timeout_s: float = 300, poll_s: float = 0.2) -> None:
        self.registry = weight_registry(key_prefix)
        self.timeout_s = timeout_s
        self.poll_s = poll_s

    def latest_version(self) -> int | None:
        import ray

        latest = ray.get(self.registry.latest.remote(), timeout=self.timeout_s)
        return None if latest is None else latest[0]

    def wait_for_version(self, timeout_s: float) -> int | None:
        return poll(self.latest_version, timeout_s, self.poll_s)

    def chunks(self, version: int) -> Iterator[list[PackedTensor]]:
        import ray

        from weights.wire import WeightsUnavailable

        refs = ray.get(self.registry.get.remote(version), timeout=self.timeout_s)
        if refs is None:
            raise WeightsUnavailable(f"weights v{version} are no longer in the Ray object store")
        for ref in refs:
            yield ray.get(ref, timeout=self.timeout_s)
