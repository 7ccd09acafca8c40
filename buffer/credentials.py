"""Producers' credentials: one Redis user per actor or pool, issued and revoked by the
learner's side, that may push requests to the gate (buffer/gate.py) and read what
generation needs, and nothing else.

Why a gate and not Redis ACLs on the buffer's own keys: Redis checks every command a Lua
script runs against the caller's own rights, so a user allowed to run `put.lua` would
also be allowed to ZADD, DEL or HINCRBY the same keys directly. A credential may write one
key, its inbox; everything that changes the buffer is done by the trusted side.

A credential's record (password hash, counts, revocation) lives in Redis beside the
experiment, so that the users can be recreated after a Redis restart without an ACL file.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import redis

from buffer.keys import Keyspace

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""A credential's name, and a producer's id inside it."""
_READ_COMMANDS = ("get", "mget", "hget", "hmget", "hgetall", "hlen", "exists")
_ALWAYS = ("ping", "hello", "echo", "client|setname", "acl|whoami")


class CredentialError(ValueError):
    """A credential name that is malformed, unknown, or already issued."""


@dataclass(frozen=True)
class Credential:
    """One issued credential and what its producers did."""

    name: str
    issued_at: float
    revoked_at: float | None
    revoked_reason: str
    put: int
    refused: int
    quarantined: int


def check_name(name: str, what: str = "credential name") -> str:
    if not NAME.fullmatch(name):
        raise CredentialError(f"{what} {name!r} must be 1-64 letters, digits, '_' or '-'")
    return name


def username(key_prefix: str, name: str) -> str:
    """The Redis user of credential `name` in the experiment under `key_prefix`."""
    return f"{key_prefix}.{name}"


def credential_url(server_url: str, key_prefix: str, name: str, password: str) -> str:
    """`server_url` (any user's, or none) with this credential's user and password."""
    parts = urlsplit(server_url)
    host = parts.netloc.rsplit("@", 1)[-1]
    user = quote(username(key_prefix, name), safe="")
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def name_from_url(url: str, key_prefix: str) -> str:
    """The credential a producer URL carries; raises CredentialError for any other user."""
    user = unquote(urlsplit(url).username or "")
    if not user.startswith(f"{key_prefix}."):
        raise CredentialError(
            f"the buffer URL's user {user or '(default)'!r} is not an actor credential of "
            f"experiment {key_prefix!r}: ask its operator for one (`relay actor-credential "
            "create NAME`), never the learner's own URL"
        )
    return check_name(user[len(key_prefix) + 1 :])


def _glob(text: str) -> str:
    """`text` as a literal inside a Redis key pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def acl_rules(key_prefix: str, name: str, password_sha256: str) -> list[str]:
    """What credential `name` may do: read the experiment, its weights and the version;
    push to its inbox; pop its answers. No other key, no script, no admin command."""
    keys = Keyspace(_glob(key_prefix))
    readable = [keys.experiment, keys.experiment_files, f"{keys.prefix}:weights:*",
                keys.of("version")]  # fmt: skip
    return [
        "reset", "on", f"#{password_sha256}",
        *(f"+{command}" for command in (*_ALWAYS, *_READ_COMMANDS)),
        *(f"%R~{pattern}" for pattern in readable),
        f"(~{keys.inbox(_glob(name))} +rpush)",
        f"(~{keys.outbox(_glob(name), '*')} +blpop +lpop)",
    ]  # fmt: skip


class Credentials:
    """The credentials of one experiment; needs the default (admin) user's client."""

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self.keys = Keyspace(key_prefix)

    def create(self, name: str, rekey: bool = False) -> str:
        """Issue credential `name`; returns its password (shown once, stored only hashed).
        With `rekey`, an existing credential gets a new password instead (a resumed run's
        own actors); a revoked one stays revoked."""
        check_name(name)
        password = secrets.token_urlsafe(24)
        digest = hashlib.sha256(password.encode()).hexdigest()
        record = {"password_sha256": digest, "issued_at": time.time()}
        key = self.keys.credential(name)
        if not self.client.hsetnx(key, "issued_at", record["issued_at"]) and not rekey:
            raise CredentialError(f"credential {name!r} exists; pick another name")
        if self.client.hexists(key, "revoked_at"):
            reason = (self.client.hget(key, "revoked_reason") or b"").decode()
            raise CredentialError(f"credential {name!r} was revoked ({reason}); pick another name")
        self.client.hset(key, "password_sha256", digest)  # what `restore` applies from now on
        self._apply(name, digest)
        pipe = self.client.pipeline(transaction=True)  # active from here on
        pipe.hset(self.keys.credential(name), mapping=record)
        pipe.sadd(self.keys.credentials, name)
        pipe.execute()
        return password

    def revoke(self, name: str, reason: str) -> bool:
        """Cut credential `name` off at once: its user is disabled, its connections closed,
        its groups not yet trained are quarantined when sampled. False if already revoked."""
        key = self.keys.credential(name)
        if not self.client.exists(key):
            raise CredentialError(f"no credential {name!r} in experiment {self.key_prefix!r}")
        if not self.client.hsetnx(key, "revoked_at", time.time()):
            return False
        self.client.hset(key, "revoked_reason", reason[:500])
        self.client.sadd(self.keys.revoked, name)
        user = username(self.key_prefix, name)
        self.client.execute_command("ACL", "SETUSER", user, "reset", "off")
        self.client.execute_command("CLIENT", "KILL", "USER", user)
        self.client.delete(self.keys.inbox(name))  # what it pushed last is never served
        log.warning("revoked actor credential %r: %s", name, reason)
        return True

    def active(self) -> list[str]:
        """Names of the credentials issued and not revoked."""
        names = self.client.sdiff(self.keys.credentials, self.keys.revoked)
        return sorted(name.decode() for name in names)

    def revoked(self) -> set[str]:
        return {name.decode() for name in self.client.smembers(self.keys.revoked)}

    def count(self, name: str, outcome: str, n: int = 1) -> int | None:
        """Add `n` to a credential's `outcome` (put, refused, quarantined); returns its
        bad groups so far (refused + quarantined), or None when `name` is no credential
        (a producer on the trusted side)."""
        if not self.client.sismember(self.keys.credentials, name):
            return None
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(self.keys.credential(name), outcome, n)
        pipe.hmget(self.keys.credential(name), "refused", "quarantined")
        _, bad = pipe.execute()
        return sum(int(value or 0) for value in bad)

    def records(self) -> list[Credential]:
        """Every credential issued in this experiment, revoked ones included."""
        names = sorted(name.decode() for name in self.client.smembers(self.keys.credentials))
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.keys.credential(name))
        records = []
        for name, raw in zip(names, pipe.execute(), strict=True):
            fields = {k.decode(): v.decode() for k, v in raw.items()}
            revoked = fields.get("revoked_at")
            records.append(
                Credential(
                    name=name,
                    issued_at=float(fields.get("issued_at", 0)),
                    revoked_at=float(revoked) if revoked else None,
                    revoked_reason=fields.get("revoked_reason", ""),
                    put=int(fields.get("put", 0)),
                    refused=int(fields.get("refused", 0)),
                    quarantined=int(fields.get("quarantined", 0)),
                )
            )
        return records

    def restore(self) -> int:
        """Recreate the Redis users of active credentials that the server lost (a restart
        without an ACL file); returns how many."""
        users = {user.decode() for user in self.client.execute_command("ACL", "USERS")}
        restored = 0
        for name in self.active():
            if username(self.key_prefix, name) in users:
                continue
            digest = self.client.hget(self.keys.credential(name), "password_sha256")
            if digest is not None:
                self._apply(name, digest.decode())
                restored += 1
        if restored:
            log.warning("recreated %d actor credentials the buffer's Redis had lost", restored)
        return restored

    def _apply(self, name: str, digest: str) -> None:
        rules = acl_rules(self.key_prefix, name, digest)
        self.client.execute_command("ACL", "SETUSER", username(self.key_prefix, name), *rules)


def credential_of(producer_id: str) -> str:
    """The credential a producer id was issued under: `NAME` or `NAME/ACTOR`."""
    return producer_id.split("/", 1)[0]
