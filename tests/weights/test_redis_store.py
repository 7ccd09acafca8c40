"""The weight wire form and the Redis weight store (real redis-server)."""

from __future__ import annotations

import pytest
import torch

from buffer.server import RedisServer
from weights.redis_store import RedisWeightStore
from weights.wire import WeightsUnavailable, chunks, pack_state_dict, unpack_tensors


def test_state_dict_round_trips_through_the_wire_form() -> None:
    state = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1, 2], dtype=torch.int64),
    }
    packed = list(pack_state_dict(state))
    assert [(name, dtype, shape) for name, dtype, shape, _ in packed] == [
        ("a", "float32", [2, 3]),
        ("b", "int64", [2]),
    ]
    for name, tensor in unpack_tensors(packed):
        assert torch.equal(tensor, state[name])


def test_chunks_respect_the_byte_budget() -> None:
    packed = [
        (f"t{i}", "uint8", [size], bytes(size)) for i, size in enumerate([40, 40, 30, 100, 10])
    ]
    sizes = [[len(item[3]) for item in chunk] for chunk in chunks(packed, max_bytes=80)]
    # 40 + 40 = 80 fits; 30 starts a new chunk; 100 exceeds the budget alone; 10 follows.
    assert sizes == [[40, 40], [30], [100], [10]]


@pytest.fixture
def store(redis_server: RedisServer, request: pytest.FixtureRequest) -> RedisWeightStore:
    # Parts of 1 KiB, so that the 4 KiB tensor below is split into four.
    return RedisWeightStore(
        redis_server.client(), f"test:{request.node.name}", part_mib=1 / 1024, keep_versions=2
    )


def state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(32, 32, generator=generator),  # 4 KiB: four parts
        "norm.weight": torch.randn(32, generator=generator, dtype=torch.float64),
        "empty": torch.zeros(0),
    }


def test_publish_and_fetch_round_trip(store: RedisWeightStore) -> None:
    assert store.latest_version() is None
    report = store.publish(3, state(3))
    assert (report.version, report.tensors, report.bytes) == (3, 3, 32 * 32 * 4 + 32 * 8)
    assert store.latest_version() == 3
    fetched = store.fetch(3)
    assert fetched.keys() == state(3).keys()
    assert all(torch.equal(fetched[name], tensor) for name, tensor in state(3).items())
    assert fetched["norm.weight"].dtype == torch.float64


def test_only_the_newest_versions_are_kept(store: RedisWeightStore) -> None:
    for version in (1, 2, 3):
        store.publish(version, state(version))
    assert store.latest_version() == 3
    assert torch.equal(store.fetch(2)["embed.weight"], state(2)["embed.weight"])
    with pytest.raises(WeightsUnavailable, match=r"v1 are not in the store \(latest: 3\)"):
        store.fetch(1)


def test_corruption_is_detected(store: RedisWeightStore) -> None:
    store.publish(1, state(1))
    store.client.hset(store.keys.weights_tensors(1), "embed.weight#2", b"\x00" * 1024)
    with pytest.raises(WeightsUnavailable, match=r"embed\.weight is corrupted"):
        store.fetch(1)


def test_stream_is_chunked(store: RedisWeightStore) -> None:
    store.publish(1, state(1))
    sizes = [sum(len(item[3]) for item in chunk) for chunk in store.stream(1, max_bytes=1024)]
    assert sizes == [4096, 256]  # the 4 KiB tensor alone, then the rest


def test_wait_for_newer(store: RedisWeightStore) -> None:
    assert store.wait_for_newer(None, timeout_s=0.1) is None
    store.publish(4, state(4))
    assert store.wait_for_newer(None, timeout_s=1) == 4
    assert store.wait_for_newer(4, timeout_s=0.2, poll_s=0.05) is None
