"""buffer.replay: each group trained up to R times, every use counted and acked once,
crashes between uses (real redis-server)."""

from __future__ import annotations

import pytest

from buffer.replay_buffer import ReplayBuffer
from buffer.stats import read_stats
from tests.buffer.factories import make_completion, make_group, versioned_group

LEARNER = "learner-0"


def test_fresh_groups_come_first_and_the_freshest_replays_fill_the_batch(make_buffer) -> None:
    buffer = make_buffer(replay=2, max_staleness=10)
    buffer.put([versioned_group(f"old{v}", v) for v in range(3)], "actor")
    buffer.set_version(3)
    assert buffer.ack(buffer.sample(3)).reused == 3  # each offered for a second use
    buffer.put([versioned_group("new", 3)], "actor")
    batch = buffer.sample(3)
    # The fresh group, then the replays of versions 2 and 1 (the freshest); old0 waits.
    assert batch.entry_ids == ["new", "old2", "old1"]
    assert [g.reuse for g in batch.groups] == [0, 1, 1]
    assert [g.staleness for g in batch.groups] == [0, 1, 2]  # each use's own staleness
    stats = read_stats(buffer)
    assert (stats.depth, stats.replay_depth, stats.claimed) == (0, 1, 3)


def test_a_group_with_equal_rewards_is_not_replayed(make_buffer) -> None:
    buffer = make_buffer(replay=4)
    solved = make_group(make_completion(reward=1.0), make_completion(reward=1.0), group_id="u")
    buffer.put([solved], "actor")
    assert buffer.ack(buffer.sample(1)).reused == 0
    assert buffer.sample(1).groups == []
    assert read_stats(buffer).counters["acked"] == 1


def test_replays_staler_than_the_bound_expire_and_are_counted_apart(make_buffer) -> None:
    buffer = make_buffer(replay=3, max_staleness=2)
    buffer.put([versioned_group("g", 0)], "actor")
    buffer.ack(buffer.sample(1))
    buffer.set_version(3)
    assert buffer.sample(1).groups == []
    counters = read_stats(buffer).counters
    assert (counters["replays_expired"], counters["dropped_stale"]) == (1, 0)
    assert buffer.client.exists(buffer.payload_key("g")) == 0


def test_ack_with_the_next_sample_replays_at_once(make_buffer) -> None:
    # A learner without checkpoints acks its batch in the round trip of its next sample:
    # the group it just trained on is already its replay.
    buffer = make_buffer(replay=2)
    buffer.put([versioned_group("g", 0)], "actor")
    first = buffer.sample(1)
    second = buffer.sample(1, ack=first)
    assert second.previous_ack.reused == 1
    assert (second.entry_ids, second.groups[0].reuse) == (["g"], 1)


def test_offered_replays_are_sampled_before_their_checkpoint(make_buffer) -> None:
    buffer = make_buffer(replay=2, visibility_timeout_s=60)
    buffer.put([versioned_group("g", 0)], "actor")
    first = buffer.sample(1, hold_as=LEARNER)
    assert buffer.offer_replays(first) == 1
    second = buffer.sample(1, hold_as=LEARNER)
    assert second.groups[0].reuse == 1
    assert buffer.offer_replays(second) == 0  # no use left
    result = buffer.commit(LEARNER, [first, second])
    assert (result.acked, result.stale_claims) == (2, 0)
    stats = read_stats(buffer)
    assert (stats.depth, stats.replay_depth, stats.claimed) == (0, 0, 0)
    assert stats.counters["acked"] == 2
    assert buffer.client.zscore(buffer.key("acked"), "g") is not None  # tombstoned


def restarted(buffer: ReplayBuffer) -> ReplayBuffer:
    """A new learner process's client of the same buffer."""
    return ReplayBuffer(buffer.client, buffer.config.model_copy())


def test_a_crash_between_two_uses_retrains_only_the_uncommitted_one(make_buffer) -> None:
    buffer = make_buffer(replay=2, visibility_timeout_s=60)
    buffer.put([versioned_group("g", 0)], "actor")
    # Use 1: trained, offered, committed by a checkpoint.
    first = buffer.sample(1, hold_as=LEARNER)
    buffer.offer_replays(first)
    buffer.commit(LEARNER, [first])
    # Use 2: trained after that checkpoint; the learner dies before the next one.
    second = buffer.sample(1, hold_as=LEARNER)
    assert second.groups[0].reuse == 1
    # --resume: everything held after the checkpoint is given back.
    resumed = restarted(buffer)
    resumed.abandon(LEARNER, resumed.held(LEARNER))
    again = resumed.sample(1, hold_as=LEARNER)
    assert (again.entry_ids, again.groups[0].reuse) == (["g"], 1)  # use 2 again, not use 3
    resumed.commit(LEARNER, [again])
    stats = read_stats(resumed)
    assert stats.counters["acked"] == 2  # use 1 once, use 2 once
    assert stats.sampled_uses_histogram == {1: 1, 2: 2}  # use 2 was handed out twice
    assert resumed.sample(1).groups == []  # both uses spent: forgotten


def test_a_crash_with_both_uses_uncommitted_gives_back_both(make_buffer) -> None:
    buffer = make_buffer(replay=2, visibility_timeout_s=60)
    buffer.put([versioned_group("g", 0)], "actor")
    first = buffer.sample(1, hold_as=LEARNER)
    buffer.offer_replays(first)
    buffer.sample(1, hold_as=LEARNER)  # use 2 of the same group, also uncommitted
    resumed = restarted(buffer)
    resumed.abandon(LEARNER, resumed.held(LEARNER))
    assert resumed.sample(1).groups[0].reuse == 0  # both uses given back: fresh again
    stats = read_stats(resumed)
    assert stats.sampled_uses_histogram == {1: 2, 2: 1}
    assert (stats.counters["acked"], stats.counters["redelivered"]) == (0, 2)


@pytest.mark.parametrize("replay", [1, 3])
def test_an_expired_claim_gives_its_use_back(make_buffer, replay: int) -> None:
    buffer = make_buffer(replay=replay, visibility_timeout_s=0.05)
    buffer.put([versioned_group("g", 0)], "actor")
    lost = buffer.sample(1)  # its consumer never acks
    buffer.client.zadd(buffer.key("claimed"), {lost.token: 0})  # its deadline passed
    again = buffer.sample(1)
    assert (again.entry_ids, again.groups[0].reuse) == (["g"], 0)
    assert buffer.ack(lost).stale_claims == 1  # the late owner's ack counts nothing
    assert buffer.ack(again).acked == 1
    assert read_stats(buffer).counters["redelivered"] == 1
