"""The Redis replay buffer: staleness-tagged, exactly-once acknowledged, bounded, observable.

Every state change is one Lua script, so concurrent actors and learner ranks see it as
atomic (docs/buffer.md has the data layout and the guarantees):

- `put` stores a validated, encoded group, once per group id;
- `reserve` grants admission leases that keep staleness bounded without dropping work;
- `sample` claims the oldest admissible groups for one consumer and drops the ones
  beyond `max_staleness`, counted;
- `ack` finishes a claim (or puts the group back for replay); claims not acked within
  the visibility timeout return to the buffer;
- entries that fail to decode are quarantined with the reason, never handed out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

import msgpack
import redis

from buffer.codec import EncodedGroup, OutOfLimits, decode_groups, encode_each
from buffer.config import BufferConfig
from buffer.credentials import Credentials, credential_of
from buffer.keys import Keyspace
from buffer.polling import poll
from buffer.schema import Limits, MalformedRollout, RolloutGroup

log = logging.getLogger(__name__)

# Each script runs as `body()` under this: a call carries a request id as its last
# argument, and its reply is kept for a while under that id. A client that resends a
# call (its connection dropped, the server paused past the socket timeout and then ran
# both) gets the first reply back, and nothing happens twice. A resent `sample` lists
# its ids again for the SORT ... GET that follows it in the same round trip.
#
# Before it, the caller's learner epoch (last but one argument; '' for actors and tools):
# a learner replaced by a newer one of the same experiment is refused (FENCED), so it can
# neither commit, claim nor publish a version any more.
_IDEMPOTENT = """
local REQUEST_KEY = K_REQUESTS .. ':' .. table.remove(ARGV)
local EPOCH = table.remove(ARGV)
local done = redis.call('GET', REQUEST_KEY)
if done then
  local reply = cmsgpack.unpack(done)
  ON_RESEND
  return reply
end
if EPOCH ~= '' then
  local current = redis.call('GET', K_EPOCH) or '0'
  if current ~= EPOCH then
    return redis.error_reply('FENCED learner epoch ' .. EPOCH .. ' replaced by ' .. current)
  end
end
local reply = body()
redis.call('SET', REQUEST_KEY, cmsgpack.pack(reply), 'PX', TTL_MS)
return reply
"""
_SCRIPTS = (
    "put", "sample", "ack", "replay", "quarantine", "reserve", "release", "extend", "set_version",
)  # fmt: skip
_ON_RESEND = {
    "sample": """redis.call('DEL', ARGV[7])
  for i = 2, #reply, 3 do redis.call('RPUSH', ARGV[7], reply[i]) end
  redis.call('PEXPIRE', ARGV[7], tonumber(ARGV[4]))""",
}
# First and longest wait between polls while blocked. A learner waiting for its batch
# polls at most every 20 ms: at a few steps a second, a longer wait would be its idle time.
_POLL_S = (0.005, 0.02)
DROP_REASONS = ("uniform",)
"""Why an actor may drop a generated group: `uniform` rewards give no group-relative signal."""


class FencedOut(RuntimeError):
    """A newer learner of the same experiment took over; this one may no longer write."""


class BufferFull(RuntimeError):
    """A blocking put found no room within `put_timeout_s`."""


@dataclass(frozen=True)
class PutResult:
    """How many groups were stored, how many were already there (retries), and which were
    refused as malformed (quarantined): their ids and why."""

    stored: int
    duplicates: int
    refused: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class SampledGroup:
    """A claimed group with its buffer entry id and how stale it is."""

    entry_id: str
    group: RolloutGroup
    staleness: int
    """The learner's version minus the group's oldest token version, at this use."""
    reuse: int
    """How many uses of this group were handed out before this one (0: a fresh group)."""

    @property
    def worth_replaying(self) -> bool:
        """Its rewards differ, so group-relative advantages give it a gradient."""
        rewards = [c.reward for c in self.group.completions]
        return min(rewards) != max(rewards)


@dataclass(frozen=True)
class Batch:
    """Groups claimed by one `sample` call; ack them with `ReplayBuffer.ack(batch)`."""

    token: str
    learner_version: int
    groups: list[SampledGroup] = field(default_factory=list)
    previous_ack: AckResult | None = None
    """The result of acking the batch passed as `sample(ack=...)`."""

    @property
    def entry_ids(self) -> list[str]:
        return [g.entry_id for g in self.groups]

    @property
    def replay_flags(self) -> list[bool]:
        """Per group, whether another use of it is worth offering."""
        return [g.worth_replaying for g in self.groups]


@dataclass(frozen=True)
class HeldBatch:
    """A claimed batch as recorded in the journal of held claims (no payloads)."""

    token: str
    entry_ids: list[str]

    @property
    def replay_flags(self) -> list[bool]:
        """Unknown without the groups: none is offered again."""
        return [False] * len(self.entry_ids)


@dataclass(frozen=True)
class AckResult:
    """Which claims were acked, how many had expired (not acked), how many were offered for
    another use (buffer.replay)."""

    acked_ids: list[str]
    stale_claims: int
    reused: int

    @property
    def acked(self) -> int:
        return len(self.acked_ids)


@dataclass(frozen=True)
class QuarantineRecord:
    """An entry that failed to decode: its id, why, when, and its raw bytes."""

    entry_id: str
    reason: str
    at_ms: int
    payload: bytes
    producer: str = ""
    """Who put it, where known."""


class ReplayBuffer:
    """Client of the replay buffer; many producers and consumers may share one Redis."""

    def __init__(self, client: redis.Redis, config: BufferConfig) -> None:
        self.client = client
        self.config = config
        self.keyspace = Keyspace(config.key_prefix)
        common = _lua("common.lua")
        # Replies are kept past the longest time a client goes on resending a call.
        ttl_ms = str(int((config.outage_limit_s + 300) * 1000))
        self._sources = {
            name: common
            + f"local function body()\n{_lua(f'{name}.lua')}\nend\n"
            + _IDEMPOTENT.replace("ON_RESEND", _ON_RESEND.get(name, "")).replace("TTL_MS", ttl_ms)
            for name in _SCRIPTS
        }
        self.epoch = ""
        """This client's learner epoch once `fence_out_older_learners` ran; '' otherwise."""
        # Loaded at the first NOSCRIPT, not here: a read-only client (the dashboard's)
        # may not load scripts, and one that never runs them needs no round trip.
        self._shas = {
            name: hashlib.sha1(code.encode()).hexdigest() for name, code in self._sources.items()
        }

    def _load_scripts(self) -> None:
        for name, source in self._sources.items():
            self._shas[name] = self.client.script_load(source)

    # -- the policy version ------------------------------------------------------------
    def version(self) -> int:
        """The learner's current policy version (0 before the first push)."""
        return int(self.client.get(self.keyspace.of("version")) or 0)

    def bump_version(self) -> int:
        """Publish the next policy version; returns it."""
        return self.set_version(self.version() + 1)

    def set_version(self, version: int) -> int:
        """Publish `version` (e.g. after a push, or when a learner resumes above every
        published one). Versions only grow: this is the one place that makes sure; returns
        the version now in force."""
        return int(self._run("set_version", version))

    def fence_out_older_learners(self, epoch: int | None = None) -> int:
        """Become the experiment's only learner: take a new learner epoch (or join `epoch`,
        the one rank 0 took), after which every script call of an older learner's client
        is refused with FencedOut. Returns the epoch."""
        if epoch is None:
            epoch = int(self.client.incr(self.keyspace.of("learner_epoch")))
        self.epoch = str(epoch)
        return epoch

    # -- producers -----------------------------------------------------------------------
    def reserve(self, producer_id: str, n_groups: int) -> tuple[int, list[str]]:
        """Admission leases for up to `n_groups` new groups, and the version to generate with.

        Without admission control every request is granted (leases are then empty strings).
        """
        if not self.config.admission_control:
            return self.version(), [""] * n_groups
        reply = self._run(
            "reserve",
            n_groups,
            f"{producer_id}:",
            int(self.config.lease_timeout_s * 1000),
            self.config.groups_per_version,
            self.config.max_staleness,
        )
        return int(reply[0]), [lease.decode() for lease in reply[1:]]

    def release(self, leases: Sequence[str], reason: str | None = None) -> None:
        """Give back leases whose groups will not be put: unused (the actor stopped early),
        or generated and dropped for `reason`, counted as `dropped_<reason>`."""
        if reason is not None and reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}; valid: {', '.join(DROP_REASONS)}")
        counter = f"dropped_{reason}" if reason else ""
        held = [lease for lease in leases if lease]  # "" without admission control
        if held or counter:
            self._run("release", counter, len(leases) if counter else 0, *held)

    def release_producer(self, producer_id: str) -> int:
        """Give back every lease `producer_id` holds: called by a producer as it starts, so
        that the leases of its dead predecessor (same id) do not block admission until
        they time out. Returns how many were released."""
        prefix = f"{producer_id}:".encode()
        leases = [
            m for m in self.client.zrange(self.keyspace.of("leases"), 0, -1) if m.startswith(prefix)
        ]
        return int(self._run("release", "", 0, *leases)) if leases else 0

    def put(
        self, groups: Sequence[RolloutGroup], producer_id: str, leases: Sequence[str] = ()
    ) -> PutResult:
        """Store groups (validated and encoded here); blocks or evicts when full, per config.

        A group whose id is stored, or was acked within `dedup_window_s`, is not stored
        again, so a producer may safely retry a put whose reply it did not see. A malformed
        group (or one outside `vocab_size` / `max_sequence_tokens`) is quarantined with
        its reason and its lease given back; the others are stored.
        """
        encoded = encode_each(groups, self.config.vocab_size, self.config.max_sequence_tokens)
        leases = list(leases) or [""] * len(groups)
        bad = [i for i, e in enumerate(encoded) if isinstance(e, MalformedRollout)]
        refused = [(groups[i].group_id, str(encoded[i])) for i in bad]
        if refused:
            self.refuse(refused, [leases[i] for i in bad], producer_id)
        pending = [i for i, e in enumerate(encoded) if not isinstance(e, MalformedRollout)]
        stored = duplicates = 0

        def attempt() -> PutResult | None:
            nonlocal pending, stored, duplicates
            # One transaction for the whole batch; safe to redo (put is idempotent per id).
            statuses = self.store(
                [encoded[i] for i in pending],
                [groups[i].group_id for i in pending],
                [leases[i] for i in pending],
                producer_id,
            )
            full = []
            for i, status in zip(pending, statuses, strict=True):
                if status == b"ok":
                    stored += 1
                elif status == b"duplicate":
                    duplicates += 1
                else:
                    full.append(i)
            pending = full
            return None if pending else PutResult(stored, duplicates, refused)

        if not pending:
            return PutResult(0, 0, refused)
        if (result := poll(attempt, self.config.put_timeout_s, *_POLL_S)) is None:
            raise BufferFull(
                f"buffer full for {self.config.put_timeout_s:g}s "
                f"(capacity_groups={self.config.capacity_groups}, "
                f"capacity_mib={self.config.capacity_mib:g}); "
                f"{stored} of {len(groups)} stored"
            )
        return result

    def refuse(self, reasons: list[tuple[str, str]], leases: list[str], producer: str) -> None:
        """Quarantine groups refused at put (nothing of them is stored) with their reasons,
        give back their leases and count them against `producer`."""
        at_ms = int(time.time() * 1000)
        pipe = self.client.pipeline(transaction=True)
        for group_id, reason in reasons:
            record = {"id": str(group_id)[:200], "reason": reason[:500], "at_ms": at_ms,
                      "payload": b"", "producer": producer}  # fmt: skip
            pipe.rpush(self.keyspace.of("quarantine"), msgpack.packb(record))
            log.warning("refused group %s from %s at put: %s", group_id, producer, reason)
        pipe.hincrby(self.keyspace.of("counters"), "quarantined", len(reasons))
        pipe.hincrby(self.keyspace.producer(producer), "refused", len(reasons))
        pipe.sadd(self.keyspace.of("producers"), producer)
        pipe.execute()
        self.release(leases)
        self._count_bad(producer, "refused", len(reasons))

    def store(
        self,
        encoded: Sequence[EncodedGroup],
        group_ids: Sequence[str],
        leases: Sequence[str],
        producer: str,
    ) -> list[bytes]:
        """One attempt to store encoded groups: per group b"ok", b"duplicate" or b"full".

        Writes the payloads with SET NX and indexes them with put.lua, in one MULTI.

        The payloads never pass through Lua (which would copy every byte twice more), and
        MULTI makes the writes and the script one step: no client sees a payload without
        its index, and a producer dying mid-call leaves nothing behind. EVAL, not EVALSHA,
        because a NOSCRIPT error inside MULTI would leave the SETs done without the script;
        Redis caches the compiled script, so EVAL costs only the source's bytes.
        """
        args: list = [
            producer,
            self.config.capacity_groups,
            int(self.config.capacity_mib * 1024 * 1024),
            self.config.overflow,
            int(self.config.dedup_window_s * 1000),
            self.keyspace.producer(producer),
        ]
        pipe = self.client.pipeline(transaction=True)
        for entry, group_id, lease in zip(encoded, group_ids, leases, strict=True):
            pipe.set(self.keyspace.payload(group_id), entry.payload, nx=True)
            args += [group_id, entry.min_version, entry.max_version, entry.n_tokens, lease]
        keys = (len(self.keyspace.script_keys), *self.keyspace.script_keys)
        pipe.eval(self._sources["put"], *keys, *args, self.epoch, uuid.uuid4().hex)
        return pipe.execute()[-1]

    # -- consumers -----------------------------------------------------------------------
    def sample(
        self,
        n_groups: int,
        timeout_s: float = 0.0,
        ack: Batch | None = None,
        hold_as: str | None = None,
    ) -> Batch:
        """Claim `n_groups` groups within `max_staleness`, waiting up to `timeout_s` for them.

        Returns a batch of exactly `n_groups`, or an empty batch when they did not come in
        time. Entries that fail to decode are quarantined and replaced. `ack` acks the
        previous batch in the same round trip (its result is `batch.previous_ack`).
        `hold_as` records the claims in `hold_as`'s journal of held claims atomically with
        claiming them (see `commit`).
        """
        token = uuid.uuid4().hex
        claimed: list[SampledGroup] = []
        previous_ack = None
        version = 0

        def attempt() -> Batch | None:
            nonlocal previous_ack, version, claimed
            missing = n_groups - len(claimed)
            # The first claim is all or nothing; replacements of quarantined entries may be partial.
            ack_now = ack if ack is not None and previous_ack is None and ack.groups else None
            ack_reply, reply, payloads, revoked = self._claim(
                missing, missing if not claimed else 1, token, hold_as or "", ack_now
            )
            if ack_reply is not None:
                previous_ack = self._ack_result(ack_reply)
            version = int(reply[0])
            claimed += self._decode_claims(reply[1:], payloads, version, token, revoked)
            return (
                Batch(token, version, claimed, previous_ack) if len(claimed) == n_groups else None
            )

        if (batch := poll(attempt, timeout_s, *_POLL_S)) is not None:
            return batch
        if claimed:
            # Give back a partial batch rather than holding it: expire it now.
            self._expire([Batch(token, version, claimed)])
            if hold_as:
                self.forget_held(hold_as, [Batch(token, version)])
        return Batch(token, version, [], previous_ack)

    def _claim(
        self, n: int, min_n: int, token: str, hold_as: str, ack: Batch | HeldBatch | None
    ) -> tuple[list | None, list, list, set[str]]:
        """One round trip: ack `ack` (if any), claim up to `n` groups, read their payloads.

        Returns the ack script's reply (None without `ack`), the sample script's reply
        ({version, id, min_version, reuse, ...}), the claimed payloads in claim order and
        the revoked producer credentials.
        """
        listed = self.keyspace.listed(token)
        visibility_ms = int(self.config.visibility_timeout_s * 1000)
        claim = [n, min_n, self.config.max_staleness, visibility_ms, token, hold_as, listed,
                 self.config.max_deliveries]  # fmt: skip
        calls = [("sample", claim)]
        if ack is not None:
            calls.insert(0, self._ack_call(ack))
        *replies, payloads, _, revoked = self._eval_many(
            calls,
            then=[
                ("SORT", listed, "BY", "nosort", "GET", self.keyspace.payload("*")),
                ("DEL", listed),
                ("SMEMBERS", self.keyspace.revoked),
            ],
        )
        revoked = {name.decode() for name in revoked}
        return (replies[0] if ack is not None else None), replies[-1], payloads, revoked

    def _decode_claims(
        self, flat: list, payloads: list, version: int, token: str, revoked: set[str]
    ) -> list[SampledGroup]:
        """The claimed groups that pass the learner's own checks (well-formed, within the
        run's `Limits`, from a producer not revoked); the others are quarantined, naming
        their producer. The producer's own checks are never relied on: actors may run on
        hosts the learner does not control."""
        entry_ids = [entry_id.decode() for entry_id in flat[0::3]]
        if not entry_ids:
            return []
        groups = []
        limits = Limits(self.config.vocab_size, self.config.max_sequence_tokens, version)
        results = iter(decode_groups([p for p in payloads if p is not None], limits))
        for entry_id, payload, min_version, reuse in zip(
            entry_ids, payloads, flat[1::3], flat[2::3], strict=True
        ):
            if payload is None:
                # Only a claim that outlived its visibility timeout can lose its entry.
                log.warning("claimed entry %s vanished before it was read", entry_id)
                continue
            group = next(results)
            if isinstance(group, MalformedRollout):
                producer = group.producer if isinstance(group, OutOfLimits) else ""
                self._quarantine_claimed(entry_id, token, producer, str(group))
                continue
            if credential_of(group.actor_id) in revoked:
                reason = (f"group {group.group_id!r} from {group.actor_id!r}: its producer's "
                          f"credential {credential_of(group.actor_id)!r} was revoked")  # fmt: skip
                self._quarantine_claimed(entry_id, token, group.actor_id, reason)
                continue
            groups.append(SampledGroup(entry_id, group, version - int(min_version), int(reuse)))
        return groups

    def _quarantine_claimed(self, entry_id: str, token: str, producer: str, reason: str) -> None:
        """Quarantine a claimed entry that failed decoding or `untrusted`, count it against
        its producer ('' if unknown), and revoke a credential that sent too many bad groups."""
        self._run("quarantine", entry_id, token, reason[:500], producer)
        log.warning("quarantined buffer entry %s: %s", entry_id, reason)
        if producer:
            self.client.hincrby(self.keyspace.producer(producer), "quarantined", 1)
            self._count_bad(producer, "quarantined")

    def _count_bad(self, producer: str, outcome: str, n: int = 1) -> None:
        """Count `n` bad groups against `producer`'s credential; revoke it at the limit."""
        credentials = Credentials(self.client, self.config.key_prefix)
        bad = credentials.count(credential_of(producer), outcome, n)
        limit = self.config.revoke_after_bad_groups
        if bad is not None and limit and bad >= limit:
            reason = f"{bad} bad groups (buffer.revoke_after_bad_groups={limit})"
            credentials.revoke(credential_of(producer), reason)

    def ack(self, batch: Batch) -> AckResult:
        """Finish the batch's claims after the learner step that used them."""
        if not batch.groups:
            return AckResult([], 0, 0)
        (reply,) = self._eval_many([self._ack_call(batch)])
        return self._ack_result(reply)

    def quarantine(self, batch: Batch | HeldBatch, reason: str) -> int:
        """Quarantine a claimed batch the learner could not train on (a non-finite loss or
        gradient), with `reason`; returns how many of its groups were still claimed."""
        calls = [
            ("quarantine", [entry_id, batch.token, reason[:500]]) for entry_id in batch.entry_ids
        ]
        return sum(self._eval_many(calls)) if calls else 0

    def offer_replays(self, batch: Batch) -> int:
        """Offer a trained batch's groups for their next use now (buffer.replay > 1), while
        its claims stay held until the checkpoint that acks them; returns how many."""
        if self.config.replay == 1 or not batch.groups:
            return 0
        (offered,) = self._eval_many([self._uses_call("replay", batch)])
        return int(offered)

    def _ack_call(self, batch: Batch | HeldBatch) -> tuple[str, list]:
        return self._uses_call("ack", batch)

    def _uses_call(self, script: str, batch: Batch | HeldBatch) -> tuple[str, list]:
        flags = ["1" if flag else "0" for flag in batch.replay_flags]
        ids = batch.entry_ids
        return script, [batch.token, self.config.replay, len(ids), *ids, *flags]

    # -- claims held across steps ------------------------------------------------------------
    # A learner that checkpoints every N steps keeps its batches claimed until the
    # checkpoint that contains their update is saved, then acks them ("commits"). The
    # journal of held batches lives in Redis, written by the same script that claims, so
    # a restarted learner can give back everything its predecessor held uncommitted.
    def held(self, consumer: str) -> list[HeldBatch]:
        """Batches claimed with `sample(hold_as=consumer)` and not yet committed."""
        mark = f"{consumer}|".encode()
        return [
            HeldBatch(field[len(mark) :].decode(), json.loads(ids))
            for field, ids in self.client.hgetall(self.keyspace.of("held")).items()
            if field.startswith(mark)
        ]

    def extend(self, batches: Sequence[Batch | HeldBatch]) -> int:
        """Renew the visibility timeout of held claims; returns how many were still held."""
        visibility_ms = int(self.config.visibility_timeout_s * 1000)
        calls = [("extend", [b.token, visibility_ms, *b.entry_ids]) for b in batches]
        return sum(self._eval_many(calls)) if calls else 0

    def commit(self, consumer: str, batches: Sequence[Batch | HeldBatch]) -> AckResult:
        """Ack held batches and drop them from the journal."""
        if not batches:
            return AckResult([], 0, 0)
        replies = self._eval_many([self._ack_call(b) for b in batches])
        results = [self._ack_result(reply) for reply in replies]
        self.forget_held(consumer, batches)
        return AckResult(
            [i for r in results for i in r.acked_ids],
            sum(r.stale_claims for r in results),
            sum(r.reused for r in results),
        )

    def abandon(self, consumer: str, batches: Sequence[Batch | HeldBatch]) -> None:
        """Give held batches back to the buffer (their update was lost) and forget them."""
        if batches:
            self._expire(batches)
            self.forget_held(consumer, batches)

    def _expire(self, batches: Sequence[Batch | HeldBatch]) -> None:
        """Expire the batches' claims now: the next sample requeues them. Only claims still
        held by these tokens: a claim that expired may be another consumer's by now."""
        self._eval_many([("extend", [b.token, -1, *b.entry_ids]) for b in batches])

    def forget_held(self, consumer: str, batches: Sequence[Batch | HeldBatch]) -> None:
        """Drop batches from `consumer`'s journal of held claims, leaving the claims as they are."""
        self.client.hdel(self.keyspace.of("held"), *[f"{consumer}|{b.token}" for b in batches])

    @staticmethod
    def _ack_result(reply: list) -> AckResult:
        stale, reused, *acked = reply
        if stale:
            log.warning("%d claims expired before ack and were redelivered", stale)
        return AckResult([entry_id.decode() for entry_id in acked], int(stale), int(reused))

    # -- inspection ----------------------------------------------------------------------
    def quarantined(self, limit: int = 100) -> list[QuarantineRecord]:
        """The most recent quarantined entries (read back with msgpack, never unpickled)."""
        records = []
        for raw in self.client.lrange(self.keyspace.of("quarantine"), -limit, -1):
            record = msgpack.unpackb(raw, raw=True)
            records.append(
                QuarantineRecord(
                    record[b"id"].decode(),
                    record[b"reason"].decode(errors="replace"),
                    int(record[b"at_ms"]),
                    record[b"payload"],
                    record.get(b"producer", b"").decode(errors="replace"),
                )
            )
        return records

    def counter(self, name: str) -> int:
        """One of the buffer's counters (put, acked, dropped_stale, quarantined, ...)."""
        return int(self.client.hget(self.keyspace.of("counters"), name) or 0)

    def key(self, name: str) -> str:
        """The Redis key of one of the buffer's structures (for stats and tests)."""
        return self.keyspace.of(name)

    def payload_key(self, entry_id: str) -> str:
        """The Redis key holding one stored group's encoded bytes."""
        return self.keyspace.payload(entry_id)

    def _run(self, script: str, *args: object) -> list:
        (reply,) = self._eval_many([(script, list(args))])
        return reply

    def _eval_many(self, calls: list[tuple[str, list]], then: Sequence[tuple] = ()) -> list:
        """Run scripts, then the plain commands `then`, in one round trip with EVALSHA.

        Returns the scripts' replies followed by the commands'. redis-py's Script in a
        pipeline adds a SCRIPT EXISTS round trip, so scripts are loaded once; after a
        Redis restart (NOSCRIPT) they are reloaded, and the calls that did not run are
        sent again, followed by `then` again (it reads what the scripts wrote).
        """
        replies: list = [None] * len(calls)
        todo = list(range(len(calls)))
        requests = [uuid.uuid4().hex for _ in calls]  # the same on every resend
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for i in todo:
                name, args = calls[i]
                keys = (len(self.keyspace.script_keys), *self.keyspace.script_keys)
                pipe.evalsha(self._shas[name], *keys, *args, self.epoch, requests[i])
            for command in then:
                pipe.execute_command(*command)
            results = pipe.execute(raise_on_error=False)
            missing = []
            for i, result in zip(todo, results, strict=False):
                if isinstance(result, redis.exceptions.NoScriptError) and not attempt:
                    missing.append(i)
                elif isinstance(result, redis.ResponseError) and str(result).startswith("FENCED"):
                    raise FencedOut(
                        f"another learner of experiment {self.config.key_prefix!r} started "
                        f"({str(result)[len('FENCED ') :]}): this one must stop"
                    )
                elif isinstance(result, Exception):
                    raise result
                else:
                    replies[i] = result
            if not missing:
                extra = results[len(todo) :]
                for result in extra:
                    if isinstance(result, Exception):
                        raise result
                return replies + extra
            self._load_scripts()
            todo = missing
        raise AssertionError("unreachable: scripts were reloaded")


def _lua(name: str) -> str:
    return resources.files("buffer").joinpath("lua", name).read_text()
