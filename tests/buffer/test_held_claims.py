"""Claims a learner holds across steps until a checkpoint commits them (real redis-server)."""

from __future__ import annotations

import time

from tests.buffer.factories import versioned_group


def test_commit_acks_held_batches_and_clears_the_journal(make_buffer) -> None:
    buffer = make_buffer(visibility_timeout_s=60)
    buffer.put([versioned_group(f"g{i}", 0) for i in range(4)], "actor")
    first, second = buffer.sample(2, hold_as="learner-0"), buffer.sample(2, hold_as="learner-0")
    assert buffer.held("learner-1") == []
    assert {b.token for b in buffer.held("learner-0")} == {first.token, second.token}
    result = buffer.commit("learner-0", buffer.held("learner-0"))
    assert sorted(result.acked_ids) == sorted(first.entry_ids + second.entry_ids)
    assert buffer.held("learner-0") == []
    assert buffer.sample(1).groups == []  # nothing requeued


def test_abandon_gives_held_groups_back_now(make_buffer) -> None:
    buffer = make_buffer(visibility_timeout_s=60)
    buffer.put([versioned_group(f"g{i}", 0) for i in range(2)], "actor")
    batch = buffer.sample(2, hold_as="learner-0")
    buffer.abandon("learner-0", buffer.held("learner-0"))
    assert buffer.held("learner-0") == []
    again = buffer.sample(2)
    assert sorted(again.entry_ids) == sorted(batch.entry_ids)
    # The old claim token no longer holds them: a late commit from the dead owner acks nothing.
    assert buffer.commit("learner-0", [batch]).acked == 0


def test_extend_keeps_claims_past_the_visibility_timeout(make_buffer) -> None:
    buffer = make_buffer(visibility_timeout_s=1.0)
    buffer.put([versioned_group(f"g{i}", 0) for i in range(3)], "actor")
    held = buffer.sample(2)
    for _ in range(3):
        time.sleep(0.5)
        assert buffer.extend([held]) == 2
    # 1.5 s after the claim: without the renewals these two would be redelivered.
    assert len(buffer.sample(3, timeout_s=0).groups) == 0
    assert buffer.commit("learner-0", [held]).acked == 2


def test_abandon_leaves_a_claim_that_passed_to_another_consumer(make_buffer) -> None:
    buffer = make_buffer(visibility_timeout_s=0.3)
    buffer.put([versioned_group("g0", 0)], "actor")
    dead = buffer.sample(1, hold_as="learner-0")
    time.sleep(0.5)
    alive = buffer.sample(1)  # the expired claim was redelivered
    assert alive.entry_ids == dead.entry_ids
    buffer.abandon("learner-0", buffer.held("learner-0"))
    assert buffer.ack(alive).acked == 1


def test_held_claims_do_not_block_admission(make_buffer) -> None:
    # On-policy schedule: max_staleness 0, 2 groups per version. The learner holds its
    # batch until a checkpoint; after the version bump actors may start 2 more groups.
    buffer = make_buffer(max_staleness=0, groups_per_version=2)
    _, leases = buffer.reserve("actor", 5)
    assert len(leases) == 2
    buffer.put([versioned_group(f"g{i}", 0) for i in range(2)], "actor", leases)
    held = buffer.sample(2, hold_as="learner-0")
    assert buffer.reserve("actor", 5)[1] == []  # same version: nothing more to start
    buffer.bump_version()
    assert len(buffer.reserve("actor", 5)[1]) == 2
    assert buffer.commit("learner-0", [held]).acked == 2


def test_a_group_given_back_max_deliveries_times_is_quarantined_not_handed_out(make_buffer) -> None:
    # A learner that crashes on a group and resumes gives it back each time (abandon).
    buffer = make_buffer(visibility_timeout_s=60, max_deliveries=3)
    buffer.put([versioned_group("poison", 0), versioned_group("fine", 0)], "actor")
    for _ in range(3):
        batch = buffer.sample(1, hold_as="learner-0")
        assert batch.entry_ids == ["fine"]
        buffer.abandon("learner-0", buffer.held("learner-0"))
    # "fine" (first in id order) was handed out 3 times: the 4th sample quarantines it
    # and takes the next group instead.
    assert buffer.sample(1).entry_ids == ["poison"]
    (record,) = buffer.quarantined()
    assert record.entry_id == "fine"
    assert "handed out 3 times without being trained" in record.reason
    assert record.payload  # kept for inspection


def test_an_ack_starts_the_delivery_count_again(make_buffer) -> None:
    buffer = make_buffer(visibility_timeout_s=60, max_deliveries=2, replay=3)
    buffer.put([versioned_group("g", 0)], "actor")
    for _ in range(3):  # given back once, then trained: never at the limit
        buffer.abandon("learner-0", [buffer.sample(1, hold_as="learner-0")])
        assert buffer.ack(buffer.sample(1)).acked == 1
    assert buffer.quarantined() == []
    assert buffer.sample(1).groups == []  # used `replay` times: gone, not quarantined


def test_no_delivery_limit_with_max_deliveries_0(make_buffer) -> None:
    buffer = make_buffer(visibility_timeout_s=60, max_deliveries=0)
    buffer.put([versioned_group("g", 0)], "actor")
    for _ in range(5):
        buffer.abandon("learner-0", [buffer.sample(1, hold_as="learner-0")])
    assert buffer.sample(1).entry_ids == ["g"]
