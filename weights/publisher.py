"""Publishing new policy weights to the actors without holding up the next step.

The learner's side of the weight transports: `publish` copies the weights into a frame
buffer in the wire dtype (`weights.wire`; the only part the training loop waits for),
and a background thread adds the frame's checksums and its delta against the previous
version, hands the frame to each transport, then calls `on_published(version)` (the
buffer's version bump), so an actor that sees version v can always fetch v. One publish
is in flight at a time; a transport error surfaces at the next `publish` or at `drain`,
never silently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from weights.wire import Frame, FrameEncoder, WeightTransport

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """A weight transport failed or timed out."""


@dataclass(frozen=True)
class PublishTiming:
    """Seconds spent on one version: blocking the learner, and in the background."""

    version: int
    waited_s: float
    """Waiting for the previous publish to finish (0 when transports keep up)."""
    copy_s: float
    """The copy of the weights into the frame buffer, taken while the learner waits."""
    transports_s: dict[str, float] = field(default_factory=dict)
    """Per transport, in the background."""
    bytes: int = 0
    """The full frame's size in the wire dtype."""
    delta_bytes: int | None = None
    """The delta against the previous version (None: none was made)."""

    @property
    def blocking_s(self) -> float:
        return self.waited_s + self.copy_s


class WeightPublisher:
    """Copies weights, then publishes them in the background to every transport."""

    def __init__(
        self,
        transports: Sequence[WeightTransport],
        on_published: Callable[[int], None] = lambda version: None,
        timeout_s: float = 600.0,
        encoder: FrameEncoder | None = None,
    ) -> None:
        self.transports = list(transports)
        self.encoder = encoder or FrameEncoder()
        self.on_published = on_published
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-publish")
        self._pending: Future[PublishTiming] | None = None
        self.timings: list[PublishTiming] = []

    def publish(self, version: int, params: Mapping[str, torch.Tensor]) -> float:
        """Start publishing `params` as `version`; returns the seconds the caller was held."""
        started = time.perf_counter()
        self._wait()
        waited = time.perf_counter() - started
        copy_started = time.perf_counter()
        frame = self.encoder.fill(version, params)
        copy_s = time.perf_counter() - copy_started
        self._pending = self._executor.submit(self._run, frame, waited, copy_s)
        return time.perf_counter() - started

    def _run(self, frame: Frame, waited: float, copy_s: float) -> PublishTiming:
        frame = self.encoder.finish(frame)
        seconds = {}
        for transport in self.transports:
            started = time.perf_counter()
            transport.publish(frame)
            seconds[transport.name] = time.perf_counter() - started
        self.on_published(frame.version)
        delta = None if frame.delta is None else frame.delta.payload.numel()
        return PublishTiming(frame.version, waited, copy_s, seconds, frame.layout.nbytes, delta)

    def _wait(self) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        try:
            timing = pending.result(timeout=self.timeout_s)
        except TimeoutError:
            raise PublishError(
                f"publishing weights took longer than {self.timeout_s:g}s; is the weight "
                "store reachable?"
            ) from None
        except Exception as error:
            raise PublishError(f"publishing weights failed: {error}") from error
        self.timings.append(timing)
        log.debug("published v%d: %s", timing.version, timing.transports_s)

    def drain(self) -> None:
        """Wait for the publish in flight (end of run, before a checkpoint); raise its error."""
        self._wait()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._executor.shutdown(wait=True)
