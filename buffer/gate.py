"""The gate: the one way a producer's groups enter the buffer.

A producer (an actor, anywhere) holds a credential (buffer/credentials.py) that may push
requests to its inbox in Redis and pop the answers; `GateClient` is its side. `Gate` runs
on the learner's side: it pops the requests, binds each to the credential whose inbox it
came from, checks every group before it is stored (structure, finite values, the run's
vocabulary and length, versions the learner has reached, the producer's own id, a lease
it was granted) and does the reserve, put or release with the buffer's own scripts.
What fails is refused and quarantined, naming the producer; a credential over
`buffer.revoke_after_bad_groups` is revoked.

The wire is msgpack: {op, rid, actor, ...} in, {rid, ok, ...} out. Requests are bounded
in size and nesting before they are parsed.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import redis

from buffer.codec import EncodedGroup, decode_groups, encode_each
from buffer.credentials import Credentials, check_name
from buffer.keys import Keyspace
from buffer.polling import poll
from buffer.replay_buffer import DROP_REASONS, BufferFull, PutResult, ReplayBuffer
from buffer.schema import Limits, MalformedRollout, RolloutGroup
from buffer.server import BufferUnreachable, RideOutOutages
from buffer.telemetry import Telemetry

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 256 * 1024 * 1024
"""The largest request a producer may send (a put of many long groups)."""
_GROUP_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_MAX_HEALTH_BYTES = 64 * 1024
_MAX_RESERVE = 4096
_REPLY_TTL_S = 300
_WAIT_SLICE_S = 5.0  # BLPOP slices, well under the client's socket timeout
_REFRESH_S = 1.0  # how often the gate re-reads the credentials
_POLL_S = (0.01, 0.25)


class GateError(RuntimeError):
    """The gate refused a request (it names why)."""


def producer_id(credential: str, actor_id: str) -> str:
    """The id a producer's groups carry: the credential's name, or `NAME/ACTOR` when an
    actor of a pool credential has an id of its own."""
    return credential if actor_id == credential else f"{credential}/{actor_id}"


def _reply_to(actor_id: str, box: object) -> str:
    """Where the gate answers: the actor's outbox, or one of its boxes (`NAME:ACTOR.BOX`)."""
    return actor_id if box is None else f"{actor_id}.{check_name(box, 'reply box')}"


class GateClient:
    """A producer's side of the gate: reserve, put, release and report health, as one
    actor of credential `credential`, through a client logged in with it."""

    def __init__(
        self, client: redis.Redis, config: Any, credential: str, actor_id: str,
        box: str | None = None,
    ) -> None:  # fmt: skip
        self.client = client
        self.config = config
        self.credential = check_name(credential)
        self.actor_id = check_name(actor_id, "actor id")
        self.producer_id = producer_id(credential, actor_id)
        self.keys = Keyspace(config.key_prefix)
        self._box = None if box is None else check_name(box, "reply box")
        self._inbox = self.keys.inbox(credential)
        self._outbox = self.keys.outbox(credential, _reply_to(actor_id, self._box))

    def channel(self, box: str) -> GateClient:
        """The same producer with answers of its own (`box`): one thread's calls, e.g. the
        puts an actor sends while its engine goes on, never take another thread's replies."""
        return GateClient(self.client, self.config, self.credential, self.actor_id, box)

    def version(self) -> int:
        """The learner's current policy version."""
        return int(self.client.get(self.keys.of("version")) or 0)

    def reserve(self, n_groups: int) -> tuple[int, list[str]]:
        """Admission leases for up to `n_groups` new groups, and the version to generate with."""
        reply = self._call("reserve", n=n_groups)
        return int(reply["version"]), list(reply["leases"])

    def release(self, leases: Sequence[str], reason: str | None = None) -> None:
        """Give back leases whose groups will not be put (see ReplayBuffer.release)."""
        if any(leases) or reason:
            self._call("release", leases=list(leases), reason=reason)

    def release_producer(self) -> int:
        """Give back the leases a dead predecessor with this id still holds."""
        return int(self._call("release_producer")["released"])

    def put(self, groups: Sequence[RolloutGroup], leases: Sequence[str] = ()) -> PutResult:
        """Store groups through the gate; waits (up to buffer.put_timeout_s) while full.
        A group this producer's own checks refuse is not sent; its lease is given back."""
        leases = list(leases) or [""] * len(groups)
        encoded = encode_each(groups, self.config.vocab_size, self.config.max_sequence_tokens)
        refused = [(g.group_id, str(e)) for g, e in zip(groups, encoded, strict=True)
                   if isinstance(e, MalformedRollout)]  # fmt: skip
        if refused:
            log.warning("%s: %d groups refused before sending: %s", self.producer_id,
                        len(refused), refused[0][1])  # fmt: skip
            bad = [lease for e, lease in zip(encoded, leases, strict=True)
                   if isinstance(e, MalformedRollout)]  # fmt: skip
            self.release(bad)
        pending = [(e.payload, lease) for e, lease in zip(encoded, leases, strict=True)
                   if not isinstance(e, MalformedRollout)]  # fmt: skip
        stored = duplicates = 0

        def attempt() -> bool | None:
            nonlocal pending, stored, duplicates
            reply = self._call("put", groups=[payload for payload, _ in pending],
                               leases=[lease for _, lease in pending])  # fmt: skip
            stored += reply["stored"]
            duplicates += reply["duplicates"]
            refused.extend((gid, reason) for gid, reason in reply["refused"])
            pending = [pending[i] for i in reply["full"]]
            return True if not pending else None

        if pending and poll(attempt, self.config.put_timeout_s, *_POLL_S) is None:
            raise BufferFull(
                f"buffer full for {self.config.put_timeout_s:g}s; {stored} of {len(groups)} stored"
            )
        return PutResult(stored, duplicates, refused)

    def set_health(self, health: dict) -> None:
        """Report this producer's health figures (shown by the dashboard)."""
        self._send({"op": "health", "rid": "", "actor": self.actor_id, "health": health})

    def count_restart(self) -> int:
        """Note that this actor was started again; how many times it was, so far."""
        return int(self._call("restart")["restarts"])

    def _call(self, op: str, **fields: object) -> dict:
        """Send a request and wait for its answer. The request and the first wait go in one
        round trip (a pipeline whose BLPOP waits on the server): across a long link each
        call costs one round trip, not two."""
        rid = uuid.uuid4().hex
        request = {"op": op, "rid": rid, "actor": self.actor_id, **fields}
        if self._box is not None:
            request["box"] = self._box
        started = time.monotonic()
        first = True
        while (left := started + self._limit_s() - time.monotonic()) > 0:
            wait = max(1, round(min(_WAIT_SLICE_S, left)))
            if first:
                pipe = self.client.pipeline(transaction=False)
                pipe.rpush(self._inbox, msgpack.packb(request, use_bin_type=True))
                pipe.blpop([self._outbox], timeout=wait)
                popped = pipe.execute()[1]
                first = False
            else:
                popped = self.client.blpop([self._outbox], timeout=wait)
            if popped is None:
                continue
            reply = msgpack.unpackb(popped[1], raw=False)
            if reply.get("rid") != rid:
                continue  # the answer to an earlier call this producer gave up on
            if not reply["ok"]:
                raise GateError(f"the buffer's gate refused {op}: {reply['error']}")
            return reply
        raise BufferUnreachable(
            f"the buffer's gate (the learner's side) did not answer {op} within "
            f"{self._limit_s():g}s (buffer.outage_limit_s): is the learner running?"
        )

    def _limit_s(self) -> float:
        """As long as its client rides out outages, read at every wait: a producer asked
        to stop (`shorten_outages`) gives up within seconds, calls in flight included."""
        retry = self.client.get_retry()
        return retry.limit_s if isinstance(retry, RideOutOutages) else self.config.outage_limit_s

    def _send(self, request: dict) -> None:
        self.client.rpush(self._inbox, msgpack.packb(request, use_bin_type=True))


class Gate:
    """The learner's side: serves every active credential's inbox until `stop` is set."""

    def __init__(
        self,
        buffer: ReplayBuffer,
        on_failure: Callable[[], object] | None = None,
        spot_check: Callable[[RolloutGroup], str | None] | None = None,
        seed: int = 0,
    ) -> None:
        """`spot_check(group)` says why a group disagrees with the trusted side's own
        verification (actors/spot_check.py); it runs on `buffer.spot_check_fraction` of
        the groups that pass every other check."""
        self.buffer = buffer
        self.client = buffer.client
        self.config = buffer.config
        self.keys = Keyspace(self.config.key_prefix)
        self.credentials = Credentials(self.client, self.config.key_prefix)
        self.telemetry = Telemetry(self.client, self.config.key_prefix)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.failure: Exception | None = None
        """Why the gate's thread stopped, if it failed (its owner checks it)."""
        self._on_failure = on_failure
        self._spot_check = spot_check
        self._rng = random.Random(seed)

    def start(self) -> Gate:
        """Serve from a thread of its own; a failure ends it and is kept in `failure`."""
        self._thread = threading.Thread(target=self._serve_until_failure, name="relay-gate",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        return self

    def _serve_until_failure(self) -> None:
        try:
            self.serve(self._stop)
        except Exception as error:
            log.exception("the buffer's gate stopped")
            self.failure = error
            if self._on_failure is not None:
                self._on_failure()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * _WAIT_SLICE_S)

    def serve(self, stop: threading.Event) -> None:
        """Pop and answer requests, fairly across credentials, until `stop`."""
        names: list[str] = []
        refreshed = 0.0
        turn = 0
        while not stop.is_set():
            if time.monotonic() - refreshed > _REFRESH_S:
                self.credentials.restore()
                names, refreshed = self.credentials.active(), time.monotonic()
            if not names:
                stop.wait(0.2)
                continue
            turn = (turn + 1) % len(names)  # a busy inbox must not starve the others
            order = names[turn:] + names[:turn]
            popped = self.client.blpop([self.keys.inbox(n) for n in order], timeout=0.2)
            if popped is None:
                continue
            inbox, raw = popped
            try:
                self.handle(inbox.decode().rsplit(":", 1)[-1], raw)
            except redis.ResponseError as error:
                # Redis refused a write (out of memory, a flood): this request is lost,
                # the gate is not; popping the flood frees the memory.
                log.warning("gate: Redis refused handling a request of %s: %s", inbox, error)

    def handle(self, credential: str, raw: bytes) -> None:
        """Answer one request from `credential`'s inbox; a malformed one counts against it."""
        try:
            request = _parse(raw)
            actor = check_name(request.get("actor", ""), "actor id")
        except (ValueError, TypeError) as error:  # msgpack's errors are ValueErrors
            self._bad_request(credential, f"unreadable request: {error}")
            return
        producer = producer_id(credential, actor)
        op, rid = request.get("op"), str(request.get("rid", ""))[:64]
        box = request.get("box")
        try:
            reply = self._do(op, producer, request)
        except (KeyError, TypeError, ValueError, GateError) as error:
            self._bad_request(credential, f"{op!r} from {producer!r}: {error}")
            reply = {"ok": False, "error": str(error)[:500]}
        except redis.ResponseError as error:  # Redis refused (out of memory): not its fault
            log.warning("gate: Redis refused %r from %r: %s", op, producer, error)
            reply = {"ok": False, "error": f"the buffer refused it: {error}"[:500]}
        if rid:
            try:
                outbox = self.keys.outbox(credential, _reply_to(actor, box))
            except (ValueError, TypeError) as error:
                self._bad_request(credential, f"reply box of {producer!r}: {error}")
                return
            pipe = self.client.pipeline(transaction=False)
            pipe.rpush(outbox, msgpack.packb({"rid": rid, **reply}, use_bin_type=True))
            pipe.expire(outbox, _REPLY_TTL_S)
            try:
                pipe.execute()
            except redis.ResponseError as error:  # out of memory: the producer times out
                log.warning("gate: could not answer %r from %r: %s", op, producer, error)

    def _do(self, op: object, producer: str, request: dict) -> dict:
        if op == "reserve":
            n = int(request["n"])
            if not 0 <= n <= _MAX_RESERVE:
                raise GateError(f"reserve of {n} groups (0-{_MAX_RESERVE})")
            version, leases = self.buffer.reserve(producer, n)
            return {"ok": True, "version": version, "leases": leases}
        if op == "put":
            return self._put(producer, request["groups"], request["leases"])
        if op == "release":
            reason = request.get("reason")
            if reason is not None and reason not in DROP_REASONS:
                raise GateError(f"unknown drop reason {reason!r}")
            self.buffer.release(self._own_leases(producer, request["leases"]), reason)
            return {"ok": True}
        if op == "release_producer":
            return {"ok": True, "released": self.buffer.release_producer(producer)}
        if op == "health":
            health = request["health"]
            if not isinstance(health, dict) or len(json.dumps(health)) > _MAX_HEALTH_BYTES:
                raise GateError("health must be a map of at most 64 KiB")
            self.telemetry.set_health(producer, health)
            return {"ok": True}
        if op == "restart":
            return {"ok": True, "restarts": self.telemetry.count_restart(producer)}
        raise GateError(f"unknown op {op!r}")

    def _own_leases(self, producer: str, leases: object) -> list[str]:
        if not isinstance(leases, list) or not all(isinstance(lease, str) for lease in leases):
            raise GateError("leases must be a list of strings")
        foreign = [lease for lease in leases if lease and not lease.startswith(f"{producer}:")]
        if foreign:
            raise GateError(f"lease {foreign[0][:80]!r} was not granted to {producer!r}")
        return leases

    def _put(self, producer: str, payloads: object, leases: object) -> dict:
        """Check each group as the learner will, store the good ones in one attempt."""
        if not isinstance(payloads, list) or not all(isinstance(p, bytes) for p in payloads):
            raise GateError("groups must be a list of encoded groups")
        leases = self._own_leases(producer, leases)
        if len(leases) != len(payloads):
            raise GateError(f"{len(payloads)} groups but {len(leases)} leases")
        granted = self._granted(leases)
        limits = Limits(self.config.vocab_size, self.config.max_sequence_tokens,
                        self.buffer.version())  # fmt: skip
        good: list[tuple[int, RolloutGroup, EncodedGroup, str]] = []
        refused: list[tuple[str, str]] = []
        refused_leases: list[str] = []
        for i, group in enumerate(decode_groups(payloads, limits)):
            problem = self._problem(group, producer, leases[i], granted)
            if problem is not None:
                refused.append((getattr(group, "group_id", f"#{i}"), problem))
                refused_leases.append(leases[i] if leases[i] in granted else "")
                continue
            columns = group.completions.columns
            versions = columns.version_values
            encoded = EncodedGroup(payloads[i], int(versions.min()), int(versions.max()),
                                   int(columns.token_ids.size))  # fmt: skip
            good.append((i, group, encoded, leases[i]))
        if refused:
            self.buffer.refuse(refused, refused_leases, producer)
        statuses = self.buffer.store(
            [e for _, _, e, _ in good], [g.group_id for _, g, _, _ in good],
            [lease for *_, lease in good], producer,
        ) if good else []  # fmt: skip
        full = [i for (i, *_), status in zip(good, statuses, strict=True) if status == b"full"]
        return {
            "ok": True,
            "stored": sum(status == b"ok" for status in statuses),
            "duplicates": sum(status == b"duplicate" for status in statuses),
            "full": full,
            "refused": refused,
        }

    def _granted(self, leases: list[str]) -> set[str]:
        """The leases among `leases` that admission control granted and still holds."""
        held = [lease for lease in leases if lease]
        if not held:
            return set()
        scores = self.client.zmscore(self.keys.of("leases"), held)
        return {lease for lease, score in zip(held, scores, strict=True) if score is not None}

    def _problem(
        self, group: RolloutGroup | MalformedRollout, producer: str, lease: str, granted: set[str]
    ) -> str | None:
        """Why a group from `producer` may not enter the buffer, or None."""
        if isinstance(group, MalformedRollout):
            return str(group)
        if group.actor_id != producer:
            return f"claims to be from {group.actor_id!r}"
        if not _GROUP_ID.fullmatch(group.group_id):
            return "group id must be 1-128 letters, digits, '.', ':', '_' or '-'"
        if self.config.admission_control and lease not in granted:
            return "its admission lease was never granted or has expired"
        if self._spot_check is not None and self._rng.random() < self.config.spot_check_fraction:
            problem = self._spot_check(group)
            counters = self.keys.of("counters")
            self.client.hincrby(counters, "spot_checked", 1)
            if problem is not None:
                self.client.hincrby(counters, "spot_check_failed", 1)
            return problem
        return None

    def _bad_request(self, credential: str, reason: str) -> None:
        log.warning("gate: refused a request of credential %r: %s", credential, reason[:300])
        self.buffer.refuse([("request", reason)], [], credential)


def _parse(raw: bytes) -> dict:
    """A request, within size and depth bounds (msgpack refuses nesting over 1,024)."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise ValueError(f"{len(raw)} bytes, over {MAX_REQUEST_BYTES}")
    request = msgpack.unpackb(raw, raw=False, max_bin_len=MAX_REQUEST_BYTES, strict_map_key=True)
    if not isinstance(request, dict):
        raise ValueError("a request must be a map")
    return request
