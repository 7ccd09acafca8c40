"""Policy weights on the move: their wire form, and the two interfaces every transport has.

A version travels as a *frame*: every tensor in the wire dtype, laid out in one byte
buffer by a `Layout` (names, dtypes, shapes, offsets) that stays the same for the whole
run. One buffer means one copy on each side and no per-tensor round trips; the layout
lets either side view any tensor in place. Each tensor has a 64-bit xxh3 checksum.

A frame may carry a *delta* against the previous version: for each tensor whose bits
changed, the positions and new values of the changed elements (or the whole tensor when
that is smaller). An actor holding the previous version applies it to its own copy (the
`Mirror`) and checks the result against the new version's checksums, so a delta chain
reproduces the learner's wire-dtype weights bit for bit or is refused. Deltas replace
values, never add differences, so nothing drifts. In bfloat16 most elements keep their
bits from one RL step to the next (Adam's steps at RL learning rates fall below
bfloat16's rounding); in float32 nearly all change, and a delta is not worth sending.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import xxhash

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIGN = 64
_INDEX = torch.int32
_MAX_INDEXED = 2**31 - 1
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class WeightsUnavailable(RuntimeError):
    """The asked-for version is not (or no longer) in the store, or arrived corrupted."""


def checksum(buffer: torch.Tensor | memoryview | bytes) -> int:
    """64-bit xxh3 of a byte buffer (a uint8 tensor or anything with the buffer protocol)."""
    if isinstance(buffer, torch.Tensor):
        buffer = buffer.numpy()
    return xxhash.xxh3_64_intdigest(buffer)


def readonly_tensor(buffer: object) -> torch.Tensor:
    """A uint8 tensor over `buffer` without copying, read-only buffers included (Ray's
    shared-memory objects); the caller must not write to it."""
    array = np.frombuffer(buffer, dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(array)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives in a frame's buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class Layout:
    """The tensors of a frame and their place in its buffer; the same for every version."""

    def __init__(self, slots: list[Slot]) -> None:
        self.slots = slots
        self.nbytes = _aligned(max((s.offset + s.nbytes for s in slots), default=0))

    @classmethod
    def of(cls, state_dict: Mapping[str, torch.Tensor], wire_dtype: torch.dtype | None) -> Layout:
        """Floating-point tensors in `wire_dtype` (None: their own), others as they are."""
        slots, offset = [], 0
        for name, tensor in state_dict.items():
            dtype = (
                tensor.dtype if wire_dtype is None or not tensor.is_floating_point() else wire_dtype
            )
            nbytes = tensor.numel() * dtype.itemsize
            slots.append(
                Slot(name, str(dtype).removeprefix("torch."), tuple(tensor.shape), offset, nbytes)
            )
            offset = _aligned(offset + nbytes)
        return cls(slots)

    def to_json(self) -> list:
        return [[s.name, s.dtype, list(s.shape), s.offset, s.nbytes] for s in self.slots]

    @classmethod
    def from_json(cls, rows: list) -> Layout:
        return cls([Slot(n, d, tuple(shape), o, b) for n, d, shape, o, b in rows])

    def view(self, payload: torch.Tensor, slot: Slot) -> torch.Tensor:
        raw = payload[slot.offset : slot.offset + slot.nbytes]
        return raw.view(getattr(torch, slot.dtype)).view(slot.shape)

    def tensors(self, payload: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) views into `payload`, in layout order."""
        for slot in self.slots:
            yield slot.name, self.view(payload, slot)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self.slots == other.slots


@dataclass
class Delta:
    """The changes from version `base` to the next: one row per changed tensor.

    Row: [slot index, element count (-1: the whole tensor follows), offset, nbytes]. A
    sparse row holds int32 positions, then the new values, at `offset` in `payload`.
    """

    base: int
    rows: list[list[int]]
    payload: torch.Tensor

    def apply(self, layout: Layout, target: torch.Tensor) -> list[int]:
        """Write the changes into `target` (a buffer in `layout`); returns the slots touched."""
        touched = []
        for index, count, offset, nbytes in self.rows:
            slot = layout.slots[index]
            view = layout.view(target, slot).view(-1)
            raw = self.payload[offset : offset + nbytes]
            if count < 0:
                view.copy_(raw.view(view.dtype))
            else:
                positions = raw[: count * _INDEX.itemsize].view(_INDEX).long()
                view[positions] = raw[count * _INDEX.itemsize :].view(view.dtype)
            touched.append(index)
        return touched


@dataclass
class Frame:
    """One version in wire form: the full buffer, its checksums, and maybe a delta."""

    version: int
    layout: Layout
    payload: torch.Tensor
    sums: list[int]
    delta: Delta | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.layout.tensors(self.payload))


class FrameEncoder:
    """The learner's side: turns each version's weights into a frame.

    It keeps the previous frame's buffer to compute deltas from, and reuses the two
    buffers in turn, so encoding allocates nothing once the run is going. A delta is
    kept only when it is at most `max_delta_fraction` of the full size.
    """

    def __init__(
        self, wire_dtype: torch.dtype | None = None, *, deltas: bool = True,
        max_delta_fraction: float = 0.5,
    ) -> None:  # fmt: skip
        self.wire_dtype = wire_dtype
        self.deltas = deltas
        self.max_delta_fraction = max_delta_fraction
        self.layout: Layout | None = None
        self._previous: Frame | None = None
        self._spare: torch.Tensor | None = None

    def fill(self, version: int, state_dict: Mapping[str, torch.Tensor]) -> Frame:
        """Copy `state_dict` into a frame buffer, converting to the wire dtype: the one
        pass over the weights that the learner waits for. Checksums and the delta come
        from `finish`, which may run on another thread."""
        layout = Layout.of(state_dict, self.wire_dtype)
        if layout != self.layout:
            self.layout, self._previous, self._spare = layout, None, None
        payload = (
            self._spare
            if self._spare is not None
            else torch.zeros(layout.nbytes, dtype=torch.uint8)
        )
        self._spare = None
        for slot, tensor in zip(layout.slots, state_dict.values(), strict=True):
            layout.view(payload, slot).copy_(tensor.detach())
        return Frame(version, layout, payload, [])

    def finish(self, frame: Frame) -> Frame:
        """Checksums and the delta against the previous frame; `frame` becomes the previous."""
        layout = frame.layout
        frame.sums = [checksum(frame.payload[s.offset : s.offset + s.nbytes]) for s in layout.slots]
        previous = self._previous
        if self.deltas and previous is not None and previous.layout == layout:
            frame.delta = _delta(previous, frame, self.max_delta_fraction * layout.nbytes)
        if previous is not None:
            self._spare = previous.payload
        self._previous = frame
        return frame

    def encode(self, version: int, state_dict: Mapping[str, torch.Tensor]) -> Frame:
        return self.finish(self.fill(version, state_dict))


def _delta(previous: Frame, frame: Frame, max_bytes: float) -> Delta | None:
    layout = frame.layout
    rows, pieces, offset = [], [], 0
    for index, slot in enumerate(layout.slots):
        if slot.nbytes == 0 or previous.sums[index] == frame.sums[index]:
            continue  # unchanged (a 64-bit checksum collision would be a 2^-64 miss)
        bits = _BITS[getattr(torch, slot.dtype).itemsize]
        new = layout.view(frame.payload, slot).view(-1).view(bits)
        old = layout.view(previous.payload, slot).view(-1).view(bits)
        positions = (new != old).nonzero().squeeze(1)
        count = positions.numel()
        sparse_bytes = count * (_INDEX.itemsize + new.element_size())
        if sparse_bytes < slot.nbytes and new.numel() <= _MAX_INDEXED:
            piece = torch.cat(
                [positions.to(_INDEX).view(torch.uint8), new[positions].view(torch.uint8)]
            )
            rows.append([index, count, offset, piece.numel()])
        else:
            piece = frame.payload[slot.offset : slot.offset + slot.nbytes]
            rows.append([index, -1, offset, slot.nbytes])
        pieces.append(piece)
        pad = _aligned(piece.numel()) - piece.numel()
        if pad:
            pieces.append(torch.zeros(pad, dtype=torch.uint8))
        offset += piece.numel() + pad
        if offset > max_bytes:
            return None
    payload = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.uint8)
    return Delta(previous.version, rows, payload)


class Mirror:
    """An actor's copy of the version it runs, in wire form: what deltas apply to and what
    the engine loads from."""

    def __init__(self) -> None:
        self.layout: Layout | None = None
        self.payload: torch.Tensor | None = None
        self.version: int | None = None
        """None while its contents are not one whole version (before the first full
        frame, or after a failed update)."""
        self.deltas_since_full = 0

    def reset(self, layout: Layout) -> torch.Tensor:
        """Make room for a full frame in `layout`; returns the buffer to fill."""
        if self.layout != layout or self.payload is None:
            self.layout, self.payload = layout, torch.zeros(layout.nbytes, dtype=torch.uint8)
        self.version = None
        return self.payload

    def tensors(self) -> dict[str, torch.Tensor]:
        assert self.layout is not None and self.payload is not None
        return dict(self.layout.tensors(self.payload))


def tensor_chunks(
    tensors: Iterable[tuple[str, torch.Tensor]], max_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group (name, tensor) pairs into chunks of at most `max_bytes` (a larger tensor
    travels alone)."""
    chunk: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if chunk and size + nbytes > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, tensor))
        size += nbytes
    if chunk:
        yield chunk


@dataclass
class LinkStats:
    """What crossed the link from the weight store to this actor."""

    bytes: int = 0
    seconds: float = 0.0
    full_fetches: int = 0
    delta_fetches: int = 0
    last_version: int | None = None
    last_fetch_s: float = 0.0
    last_at: float = 0.0
    """time.time() of the last completed fetch."""
    last_latency_s: float | None = None
    """From the learner's publish of the last version fetched to its arrival here (where
    the source knows when it was published)."""

    def record(self, version: int, nbytes: int, seconds: float, full: bool) -> None:
        self.bytes += nbytes
        self.seconds += seconds
        self.full_fetches += full
        self.delta_fetches += not full
        self.last_version, self.last_fetch_s, self.last_at = version, seconds, time.time()

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


class WeightTransport(Protocol):
    """Where published weights go: a store any actor can read, an object store, NCCL..."""

    name: str

    def publish(self, frame: Frame) -> None:
        """Make `frame` available as its version; raise on failure."""
        ...


class WeightSource(Protocol):
    """Where an actor follows the learner's versions from (one per transport)."""

    link: LinkStats
    """What its fetches moved, and how fast."""

    def latest_version(self) -> int | None:
        """The newest version ready to fetch, or None before the first publish."""
        ...

    def wait_for_version(self, timeout_s: float) -> int | None:
        """Block until some version is published; None on timeout."""
        ...

    def fetch(self, version: int) -> int:
        """Bring `version` to this machine (the slow, link-bound part; the engine keeps
        generating meanwhile); returns the version held."""
        ...

    def chunks(self, version: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """`version`'s tensors in bounded chunks, fetched first if need be."""
        ...
