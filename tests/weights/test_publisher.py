"""The weight publisher: the learner waits for a copy only; errors and order are kept."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from weights.publisher import PublishError, WeightPublisher
from weights.wire import Frame, FrameEncoder


class SlowTransport:
    """Records what it was given, after a delay."""

    name = "slow"

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.received: list[tuple[int, dict]] = []

    def publish(self, frame: Frame) -> None:
        time.sleep(self.delay_s)
        self.received.append((frame.version, {k: v.clone() for k, v in frame.tensors().items()}))


class BrokenTransport:
    name = "broken"

    def publish(self, frame: Frame) -> None:
        raise ConnectionError("store unreachable")


def test_publish_returns_before_the_transport_finishes_and_bumps_after_it() -> None:
    transport = SlowTransport(delay_s=0.3)
    bumped: list[tuple[int, int]] = []
    publisher = WeightPublisher(
        [transport], on_published=lambda v: bumped.append((v, len(transport.received)))
    )
    params = {"w": torch.ones(3)}
    blocked = publisher.publish(1, params)
    assert blocked < 0.3  # measured: about 1e-4 s for the copy
    params["w"].add_(1)  # the learner's next step changes the weights in place
    publisher.drain()
    version, published = transport.received[0]
    assert version == 1 and published["w"].tolist() == [1.0, 1.0, 1.0]  # the copy, not a view
    assert bumped == [(1, 1)]  # the version is bumped only once the weights are there
    timing = publisher.timings[0]
    assert timing.transports_s["slow"] >= 0.3 and timing.blocking_s == pytest.approx(
        blocked, abs=0.05
    )
    publisher.close()


def test_a_second_publish_waits_for_the_first() -> None:
    transport = SlowTransport(delay_s=0.2)
    publisher = WeightPublisher([transport])
    publisher.publish(1, {"w": torch.zeros(1)})
    publisher.publish(2, {"w": torch.zeros(1)})
    publisher.close()
    assert [v for v, _ in transport.received] == [1, 2]
    assert publisher.timings[1].waited_s > 0.1


def test_a_transport_error_surfaces_at_the_next_call() -> None:
    publisher = WeightPublisher([BrokenTransport()])
    publisher.publish(1, {"w": torch.zeros(1)})
    with pytest.raises(PublishError, match="store unreachable"):
        publisher.drain()
    publisher.close()


def test_a_hung_transport_times_out() -> None:
    release = threading.Event()

    class Hung:
        name = "hung"

        def publish(self, frame: Frame) -> None:
            release.wait(5)

    publisher = WeightPublisher([Hung()], timeout_s=0.2)
    publisher.publish(1, {"w": torch.zeros(1)})
    with pytest.raises(PublishError, match=r"longer than 0\.2s"):
        publisher.drain()
    release.set()
    publisher.close()


def test_frames_carry_deltas_and_their_sizes_from_the_second_version() -> None:
    transport = SlowTransport(delay_s=0)
    publisher = WeightPublisher([transport], encoder=FrameEncoder(torch.bfloat16))
    weights = torch.zeros(1000)
    for version in (1, 2):
        publisher.publish(version, {"w": weights})
        publisher.drain()
        weights[:3] = 1.0  # version 2 changes 3 of 1,000 elements
    publisher.close()
    first, second = publisher.timings
    assert (first.bytes, first.delta_bytes) == (2048, None)  # 1,000 bf16 padded to 64 bytes
    # 3 positions (int32) + 3 bf16 values = 18 bytes, padded to 64.
    assert (second.bytes, second.delta_bytes) == (2048, 64)
    assert transport.received[1][1]["w"].dtype == torch.bfloat16
