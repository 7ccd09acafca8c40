"""Configuration of the replay buffer and of the Redis server behind it."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class BufferConfig(BaseModel):
    """The Redis replay buffer: where it lives, how stale and how full it may get."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    url: str | None = None
    """redis:// or rediss:// (TLS) URL with password; None starts an embedded redis-server."""
    key_prefix: str = Field("relay", min_length=1)
    """Namespace of every key; actors and learner of one experiment must share it (letters,
    digits, `_`, `-`, `.` and `:`: it is part of key patterns and Redis user names)."""
    max_staleness: int = Field(4, ge=0)
    """Learner version minus the oldest token version a trained group may have."""
    admission_control: bool = True
    """Bound staleness by admission: admitted <= (version + max_staleness + 1) x groups/version."""
    groups_per_version: int = Field(32, gt=0)
    """Groups the learner consumes per policy version (batch groups x push_every_steps)."""
    capacity_groups: int = Field(4096, gt=0)
    """Most groups stored at once (ready + claimed)."""
    capacity_mib: float = Field(1024, gt=0)
    """Most encoded bytes stored at once, in MiB."""
    overflow: Literal["block", "drop_oldest"] = "block"
    """When full: producers wait (up to put_timeout_s), or the oldest ready groups are evicted."""
    put_timeout_s: float = Field(60.0, gt=0)
    """How long a blocked put waits for room before raising BufferFull."""
    visibility_timeout_s: float = Field(300.0, gt=0)
    """A claimed batch not acked within this time goes back to the buffer (its learner died)."""
    lease_timeout_s: float = Field(600.0, gt=0)
    """An admission lease not turned into a put within this time is released (its actor died)."""
    replay: int = Field(1, ge=1)
    """Uses of each group: the learner may train on a group up to this many times while it
    stays within max_staleness (1: exactly once). Fresh groups are sampled first; replays
    fill the rest of a batch, the freshest first, so a learner that outpaces its actors
    trains on replays instead of waiting. A group whose rewards are all equal is never
    replayed (it has no group-relative gradient)."""
    outage_limit_s: float = Field(120.0, gt=0)
    """How long clients ride out a Redis that does not answer (restart, network, pause),
    reconnecting with backoff, before the run ends with one error naming the server."""
    max_deliveries: int = Field(3, ge=0)
    """A group handed out this many times without being acked (its learner crashed on it,
    or skipped it) is quarantined instead of handed out again, so that a poison group
    cannot come back on every `--resume`. 0 = no limit."""
    dedup_window_s: float = Field(3600.0, gt=0)
    """A group id acked within this window is refused if put again (producer retries)."""
    vocab_size: int | None = Field(None, gt=0)
    """Groups holding a token id at or above this are refused at `put` (quarantined with
    the reason). `relay` sets it from the model's config.json."""
    max_sequence_tokens: int | None = Field(None, gt=0)
    """Groups whose prompt + completion is longer are refused at `put`. `relay` sets it
    to engine.max_model_len."""

    spot_check_fraction: float = Field(0.05, ge=0, le=1)
    """Share of the groups the gate accepts that it re-verifies from their prompt id and
    completion text with the run's own environment (actors/spot_check.py). A group that
    disagrees is refused, counted against its producer. Costs one verifier call per
    completion checked, on the learner's machine."""
    revoke_after_bad_groups: int = Field(8, ge=0)
    """A producer credential whose groups were refused or quarantined this many times is
    revoked (one log line; its other groups are quarantined when sampled). 0 = never."""

    @field_validator("key_prefix")
    @classmethod
    def _no_pattern_characters(cls, prefix: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.:-]+", prefix):
            raise ValueError(
                "may hold only letters, digits, '_', '-', '.' and ':' (it is part of key "
                "patterns and of actor credentials' Redis user names)"
            )
        return prefix


class RedisServerConfig(BaseModel):
    """The embedded redis-server Relay starts when `buffer.url` is not set."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    appendfsync: Literal["always", "everysec", "no"] = "everysec"
    """AOF fsync: everysec loses <= 1 s of writes on a machine crash, none if only Redis dies."""
    maxmemory_mib: int = Field(8192, ge=0)
    """Redis memory limit in MiB (0: none). At the limit, writes are refused rather than
    anything evicted; it bounds what a flooding producer can take from the machine. Leave
    room for buffer.capacity_mib and the weight store (2 versions of the model)."""
    start_timeout_s: float = Field(30.0, gt=0)
    """How long to wait for the server to answer PING."""
    bind: str = "127.0.0.1"
    """Listen address: loopback for one machine; 0.0.0.0 when actors on other nodes must
    reach it (it always requires the generated password)."""
    advertise_host: str | None = None
    """Host in the URL given to actors; None: the bind address, or this machine's address
    when binding to all interfaces."""
