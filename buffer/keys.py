"""Every Redis key of one experiment, named in one place.

All of an experiment's keys start with its `buffer.key_prefix`, so several experiments
share one Redis. docs/buffer.md has the table of what each holds.
"""

from __future__ import annotations

SCRIPT_KEYS = (
    "payload", "ready", "live", "claimed", "claims", "uses", "vcount",
    "counters", "sampled_staleness", "acked", "leases", "quarantine", "version", "producers",
    "held", "deliveries", "requests", "learner_epoch", "replay", "pending", "sampled_uses",
)  # fmt: skip
"""The keys every Lua script receives as KEYS, in this order (buffer/lua/common.lua)."""


class Keyspace:
    """The names of an experiment's keys under `prefix`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.script_keys = [f"{prefix}:{name}" for name in SCRIPT_KEYS]
        self._script = dict(zip(SCRIPT_KEYS, self.script_keys, strict=True))
        # Telemetry's keys.
        self.health = f"{prefix}:health"
        self.restarts = f"{prefix}:restarts"
        """How often each actor id was started (a restarted actor knows it is one)."""
        self.experiment = f"{prefix}:experiment"
        self.experiment_files = f"{prefix}:experiment:files"
        # The Redis weight store's: the newest complete version, and the versions kept.
        self.weights_latest = f"{prefix}:weights:latest"
        self.weights_versions = f"{prefix}:weights:versions"
        # Producers' credentials (buffer/credentials.py): the names issued, and the revoked.
        self.credentials = f"{prefix}:credentials"
        self.revoked = f"{prefix}:credentials:revoked"

    def of(self, name: str) -> str:
        """One of the buffer's structures, by its name in `SCRIPT_KEYS`."""
        return self._script[name]

    def payload(self, entry_id: str) -> str:
        """One stored group's encoded bytes (`*` for SORT ... GET)."""
        return f"{self._script['payload']}:{entry_id}"

    def producer(self, producer_id: str) -> str:
        """A producer's counters (groups put, tokens, dropped)."""
        return f"{self.prefix}:producer:{producer_id}"

    def credential(self, name: str) -> str:
        """One credential's record: password hash, when issued or revoked, its counts."""
        return f"{self.prefix}:credential:{name}"

    def inbox(self, name: str) -> str:
        """The list a credential's producers push their requests to (buffer/gate.py):
        the only key they may write."""
        return f"{self.prefix}:inbox:{name}"

    def outbox(self, name: str, actor_id: str) -> str:
        """Where the gate answers one producer of a credential."""
        return f"{self.prefix}:outbox:{name}:{actor_id}"

    def listed(self, token: str) -> str:
        """The entry ids one `sample` call claimed, for the SORT that reads their payloads."""
        return f"{self.prefix}:listed:{token}"

    def metrics(self, source: str) -> str:
        return f"{self.prefix}:metrics:{source}"

    def weights_manifest(self, version: int) -> str:
        return f"{self.prefix}:weights:{version}:manifest"

    def weights_part(self, version: int, kind: str, index: int | str) -> str:
        """One part of a version's `full` frame or its `delta` (weights/redis_store.py)."""
        return f"{self.prefix}:weights:{version}:{kind}:{index}"
