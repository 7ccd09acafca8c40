"""A newer learner fences out an older one; policy versions only grow (real redis-server)."""

from __future__ import annotations

import pytest
import torch

from buffer.replay_buffer import FencedOut, ReplayBuffer
from tests.buffer.factories import versioned_group
from weights.redis_store import RedisWeightStore


def test_a_newer_learner_fences_out_the_older_one(make_buffer) -> None:
    old = make_buffer(visibility_timeout_s=60)
    new = ReplayBuffer(old.client, old.config)  # a second `relay learn`, same experiment
    old.put([versioned_group(f"g{i}", 0) for i in range(4)], "actor")
    old_store = RedisWeightStore(old.client, old.config.key_prefix)
    new_store = RedisWeightStore(old.client, old.config.key_prefix)
    old_store.epoch = str(old.fence_out_older_learners())
    batch = old.sample(2, hold_as="learner-0")
    old_store.publish_state(1, {"w": torch.ones(2)})
    assert old.set_version(1) == 1

    new_store.epoch = str(new.fence_out_older_learners())
    assert int(new.epoch) == int(old.epoch) + 1
    with pytest.raises(FencedOut, match="another learner of experiment"):
        old.commit("learner-0", [batch])
    with pytest.raises(FencedOut):
        old.sample(2)
    with pytest.raises(FencedOut):
        old.set_version(2)
    with pytest.raises(FencedOut, match="weights v2 not published"):
        old_store.publish_state(2, {"w": torch.zeros(2)})
    assert old_store.latest_version() == 1 and new.version() == 1
    # The new learner gives back what the old one held and carries on.
    new.abandon("learner-0", new.held("learner-0"))
    assert len(new.sample(4).groups) == 4
    new_store.publish_state(2, {"w": torch.full((2,), 2.0)})
    assert new.set_version(2) == 2 and new_store.latest_version() == 2
    # Actors and tools are never fenced.
    actor = ReplayBuffer(old.client, old.config)
    assert actor.version() == 2 and actor.put([versioned_group("late", 2)], "actor").stored == 1


def test_versions_only_grow(make_buffer) -> None:
    buffer = make_buffer()
    assert buffer.set_version(5) == 5
    assert buffer.set_version(3) == 5
    assert buffer.version() == 5
    assert buffer.bump_version() == 6
