"""The weight wire form (frames and deltas) and the Redis weight store (real redis-server)."""

from __future__ import annotations

import threading

import pytest
import torch

from buffer.server import RedisServer
from weights.redis_store import RedisWeightSource, RedisWeightStore
from weights.wire import Delta, FrameEncoder, Layout, Mirror, WeightsUnavailable, tensor_chunks


def test_layout_places_each_tensor_aligned_in_one_buffer() -> None:
    state = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1, 2], dtype=torch.int64),
        "c": torch.ones(3, dtype=torch.float64),
    }
    layout = Layout.of(state, torch.bfloat16)
    # Floating tensors take the wire dtype; integers keep theirs; every offset is 64-aligned.
    assert [(s.name, s.dtype, s.offset, s.nbytes) for s in layout.slots] == [
        ("a", "bfloat16", 0, 12), ("b", "int64", 64, 16), ("c", "bfloat16", 128, 6),
    ]  # fmt: skip
    assert layout.nbytes == 192
    assert Layout.from_json(layout.to_json()) == layout
    frame = FrameEncoder(torch.bfloat16).encode(1, state)
    tensors = frame.tensors()
    assert tensors["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and tensors["b"].tolist() == [1, 2]


def test_a_delta_holds_only_the_changed_elements_and_applies_exactly() -> None:
    encoder = FrameEncoder(torch.float32)
    before = {"w": torch.zeros(100), "n": torch.ones(4)}
    first = encoder.encode(1, before)
    mirror = first.payload.clone()
    after = {"w": torch.zeros(100), "n": torch.ones(4)}
    after["w"][[7, 42]] = torch.tensor([0.5, -2.0])
    second = encoder.encode(2, after)
    delta = second.delta
    assert delta is not None and delta.base == 1
    # Only "w" changed: 2 int32 positions + 2 float32 values = 16 bytes at offset 0.
    assert delta.rows == [[0, 2, 0, 16]]
    assert delta.payload[:8].view(torch.int32).tolist() == [7, 42]
    assert delta.payload[8:16].view(torch.float32).tolist() == [0.5, -2.0]
    assert delta.apply(second.layout, mirror) == [0]
    assert torch.equal(mirror, second.payload)


def test_a_tensor_that_changed_everywhere_travels_whole() -> None:
    encoder = FrameEncoder(torch.float32, max_delta_fraction=1.0)
    encoder.encode(1, {"w": torch.zeros(4)})
    frame = encoder.encode(2, {"w": torch.arange(4.0)})
    # 3 of 4 changed: 3 x 8 = 24 bytes sparse vs 16 dense, so the tensor goes whole (-1).
    assert frame.delta.rows == [[0, -1, 0, 16]]
    mirror = torch.zeros_like(frame.payload)
    Delta(1, frame.delta.rows, frame.delta.payload).apply(frame.layout, mirror)
    assert torch.equal(mirror, frame.payload)
    # ...and a delta above max_delta_fraction of the full size is not kept at all.
    encoder = FrameEncoder(torch.float32)
    encoder.encode(1, {"w": torch.zeros(64)})
    assert encoder.encode(2, {"w": torch.ones(64)}).delta is None


def test_chunks_respect_the_byte_budget() -> None:
    sizes = [40, 40, 30, 100, 10]
    tensors = [(f"t{i}", torch.zeros(n, dtype=torch.uint8)) for i, n in enumerate(sizes)]
    sizes = [[t.numel() for _, t in chunk] for chunk in tensor_chunks(tensors, max_bytes=80)]
    # 40 + 40 = 80 fits; 30 starts a new chunk; 100 exceeds the budget alone; 10 follows.
    assert sizes == [[40, 40], [30], [100], [10]]


@pytest.fixture
def store(redis_server: RedisServer, request: pytest.FixtureRequest) -> RedisWeightStore:
    # Parts of 1 KiB, so that the 4 KiB tensor below is split across parts.
    return RedisWeightStore(
        redis_server.client(), f"test:{request.node.name}", part_mib=1 / 1024,
        keep_versions=2, keep_deltas=3, window_mib=2 / 1024,
    )  # fmt: skip


def state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(32, 32, generator=generator),  # 4 KiB: four parts
        "norm.weight": torch.randn(32, generator=generator, dtype=torch.float64),
        "empty": torch.zeros(0),
    }


def test_publish_and_fetch_round_trip(store: RedisWeightStore) -> None:
    assert store.latest_version() is None
    report = store.publish_state(3, state(3))
    assert (report.version, report.tensors, report.delta_bytes) == (3, 3, None)
    assert report.bytes == 4096 + 256  # the float64 tensor keeps its dtype
    assert store.latest_version() == 3
    fetched = store.fetch(3)
    assert fetched.keys() == state(3).keys()
    assert all(torch.equal(fetched[name], tensor) for name, tensor in state(3).items())
    assert fetched["norm.weight"].dtype == torch.float64


def test_only_the_newest_versions_are_kept(store: RedisWeightStore) -> None:
    for version in (1, 2, 3):
        store.publish_state(version, state(version))
    assert store.latest_version() == 3
    assert torch.equal(store.fetch(2)["embed.weight"], state(2)["embed.weight"])
    with pytest.raises(WeightsUnavailable, match=r"v1 were dropped"):
        store.fetch(1)  # its manifest is kept for deltas, its full frame is not
    for version in (4, 5):
        store.publish_state(version, state(version))
    with pytest.raises(WeightsUnavailable, match=r"v1 are not in the store \(latest: 5\)"):
        store.fetch(1)

    def versions(pattern: str) -> set[str]:
        return {
            k.decode().split(":")[3] for k in store.client.keys(f"{store.key_prefix}:{pattern}")
        }

    # Manifests of the newest keep_deltas versions; full frames of the newest keep_versions.
    assert versions("weights:*:manifest") == {"3", "4", "5"}
    assert versions("weights:*:full:*") == {"4", "5"}


def test_corruption_is_detected(store: RedisWeightStore) -> None:
    store.publish_state(1, state(1))
    store.client.set(store.keys.weights_part(1, "full", 2), b"\x00" * 1024)
    with pytest.raises(WeightsUnavailable, match=r"full part 2 is corrupted"):
        store.fetch(1)


def bf16_steps(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`n` versions of a float32 model (initialised like a transformer's linear layers)
    whose steps (an RL learning rate of 1e-6) are small next to bfloat16's rounding."""
    generator = torch.Generator().manual_seed(seed)
    weights = {
        "w": 0.02 * torch.randn(4096, generator=generator),
        "b": 0.02 * torch.randn(64, generator=generator),
    }
    versions = []
    for _ in range(n):
        versions.append({k: v.clone() for k, v in weights.items()})
        for tensor in weights.values():
            tensor.add_(1e-6 * torch.randn(tensor.shape, generator=generator))
    return versions


def publish_all(store: RedisWeightStore, versions: list[dict], wire=torch.bfloat16) -> list:
    encoder = FrameEncoder(wire)
    return [store.publish(encoder.encode(v + 1, s)) for v, s in enumerate(versions)]


def test_an_actor_follows_through_deltas_and_matches_the_learner_bit_for_bit(
    store: RedisWeightStore,
) -> None:
    versions = bf16_steps(4)
    reports = publish_all(store, versions[:1])
    source = RedisWeightSource(store)
    source.fetch(1)
    assert (source.link.full_fetches, source.link.bytes) == (1, reports[0].bytes)
    reports += publish_all(store, versions)[1:]  # the encoder's first frame repeats v1
    # Steps of 1e-6 change few bfloat16 values: each delta is a small share of the frame.
    assert all(r.delta_bytes < 0.2 * r.bytes for r in reports[1:])
    source.fetch(4)  # three deltas: v2, v3, v4
    assert (source.link.full_fetches, source.link.delta_fetches) == (1, 1)
    assert source.link.bytes == reports[0].bytes + sum(r.delta_bytes for r in reports[1:])
    expected = {k: v.to(torch.bfloat16) for k, v in versions[3].items()}
    assert all(torch.equal(source.mirror.tensors()[k], expected[k]) for k in expected)
    assert source.mirror.version == 4 and source.mirror.deltas_since_full == 3


def test_a_gap_in_the_deltas_means_a_full_frame(store: RedisWeightStore) -> None:
    versions = bf16_steps(6)
    encoder = FrameEncoder(torch.bfloat16)
    store.publish(encoder.encode(1, versions[0]))
    source = RedisWeightSource(store)
    source.fetch(1)
    for v in range(2, 7):
        store.publish(encoder.encode(v, versions[v - 1]))
    # keep_deltas=3: v2's delta is gone, so v1 -> v6 cannot be bridged.
    source.fetch(6)
    assert (source.link.full_fetches, source.link.delta_fetches) == (2, 0)
    # ...and after full_every deltas in a row, a full frame again.
    source = RedisWeightSource(store, full_every=1)
    source.fetch(5)
    store.publish(encoder.encode(7, bf16_steps(7)[6]))
    source.fetch(6)
    source.fetch(7)
    assert (source.link.full_fetches, source.link.delta_fetches) == (2, 1)


def test_a_delta_that_does_not_reproduce_the_version_is_refused(store: RedisWeightStore) -> None:
    publish_all(store, bf16_steps(2))
    source = RedisWeightSource(store)
    source.fetch(1)
    source.mirror.payload[0] ^= 1  # the actor's copy went bad (a flipped bit)
    # Either the delta touched that tensor and its checksum fails (full fetch after), or it
    # did not, and the copy would stay wrong: the test flips a bit of the changed tensor.
    source.fetch(2)
    assert source.link.full_fetches == 2
    assert torch.equal(source.mirror.tensors()["w"], bf16_steps(2)[1]["w"].to(torch.bfloat16))


def test_a_dropped_connection_mid_transfer_resumes(redis_server: RedisServer) -> None:
    """CLIENT KILL while parts are read: redis-py reconnects, the read goes on, and the
    weights arrive whole (checked part by part and against the tensors' checksums)."""
    from buffer.server import connect

    store = RedisWeightStore(
        connect(redis_server.url), "test-resume", part_mib=1 / 64, window_mib=1 / 64
    )
    weights = {"w": torch.randn(1 << 20)}  # 4 MiB: 256 parts of 16 KiB, one per request
    store.publish_state(1, weights)
    admin = redis_server.client()
    stop = threading.Event()
    killed = []

    def kill_readers() -> None:
        while not stop.wait(0.01):
            killed.append(
                admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            )

    killer = threading.Thread(target=kill_readers)
    killer.start()
    try:
        fetched = store.fetch(1)
    finally:
        stop.set()
        killer.join()
    assert sum(killed) > 0 and torch.equal(fetched["w"], weights["w"])


def test_mirror_reset_keeps_its_buffer_for_the_same_layout() -> None:
    layout = Layout.of({"w": torch.zeros(8)}, None)
    mirror = Mirror()
    first = mirror.reset(layout)
    assert mirror.reset(layout) is first and mirror.version is None
