"""Policy weights on the move: their wire form, and the two interfaces every transport has.

Weights travel as a named-tensor stream: (name, dtype, shape, raw bytes) per tensor,
plus the policy version they belong to, in chunks of bounded size so that neither side
holds a second full copy of the model. The learner publishes through `WeightTransport`s
(the Redis store, Ray's object store, NCCL); an actor follows one `WeightSource` and loads
its chunks into the running engine (`weights.engine`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

import torch

PackedTensor = tuple[str, str, list[int], bytes]
"""(name, dtype name, shape, raw bytes in the host's byte order)."""


class WeightsUnavailable(RuntimeError):
    """The asked-for version is not (or no longer) in the store, or arrived corrupted."""


def pack_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Iterator[PackedTensor]:
    """The wire form of a state dict, one tensor at a time (CPU copies, raw bytes)."""
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        raw = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        yield name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), raw


def unpack_tensors(tensors: list[PackedTensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Back from the wire form to (name, tensor)."""
    for name, dtype, shape, raw in tensors:
        flat = (
            torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            if raw
            else torch.empty(0, dtype=torch.uint8)
        )
        yield name, flat.view(getattr(torch, dtype)).reshape(shape)


def chunks(
    packed: Iterator[PackedTensor] | list[PackedTensor], max_bytes: int
) -> Iterator[list[PackedTensor]]:
    """Group tensors into chunks of at most `max_bytes` (a larger tensor travels alone)."""
    chunk: list[PackedTensor] = []
    size = 0
    for item in packed:
        if chunk and size + len(item[3]) > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += len(item[3])
    if chunk:
        yield chunk


class WeightTransport(Protocol):
    """Where published weights go: a store any actor can read, an object store, NCCL..."""

    name: str

    def publish(self, version: int, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Make `state_dict` available as `version`; raise on failure."""
        ...


class WeightSource(Protocol):
    """Where an actor follows the learner's versions from (one per transport)."""

    def latest_version(self) -> int | None:
        """The newest version ready to fetch, or None before the first publish."""
        ...

    def wait_for_version(self, timeout_s: float) -> int | None:
        """Block until some version is published; None on timeout."""
        ...

    def chunks(self, version: int) -> Iterator[list[PackedTensor]]:
        """`version`'s tensors, a bounded chunk at a time (never a second full copy)."""
        ...
