"""The embedded Redis: a `redis-server` Relay starts on loopback when no URL is configured.

It runs in a directory of the run with append-only persistence and a generated
password, on a free port, and is stopped (with a final AOF flush) when the run ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry

from buffer.config import RedisServerConfig
from buffer.polling import poll

log = logging.getLogger(__name__)


class RedisServerError(RuntimeError):
    """redis-server is missing, or did not start."""


class BufferUnreachable(RedisServerError, redis.ConnectionError):
    """The buffer's Redis did not answer for longer than `buffer.outage_limit_s`."""


DEFAULT_OUTAGE_LIMIT_S = 120.0
ROLES = {
    # The dashboard and `relay status`: read commands on every key, nothing else.
    "dashboard": "%R~* &* -@all +@read +@connection +@transaction +time -@dangerous",
}
"""Redis ACL users of the embedded server besides `default`, and what each may do. Actors
get credentials of their own (buffer/credentials.py)."""
_BACKOFF_S = (0.05, 2.0)  # first and longest wait between reconnection attempts
_ONCE = Retry(NoBackoff(), 0)
_AUTH_GRACE_S = 10.0


class RideOutOutages(Retry):
    """redis-py's retry, bounded by time instead of a count: reconnect and resend with
    capped, jittered exponential backoff until the server answers, or raise one
    BufferUnreachable naming the server once `limit_s` passed since the first failure.

    Resending is safe because every Relay script is idempotent under retry (a request id
    per call, see buffer/lua/common.lua) and every other command Relay sends is a plain
    overwrite (SET, HSET, ZADD).
    """

    def __init__(self, where: str, limit_s: float) -> None:
        super().__init__(ExponentialWithJitterBackoff(cap=_BACKOFF_S[1], base=_BACKOFF_S[0]), -1)
        self.where = where
        self.limit_s = limit_s

    def __deepcopy__(self, memo: dict) -> RideOutOutages:
        # redis-py deep-copies the retry into every connection; one shared object (it
        # keeps no per-call state) lets `shorten_outages` reach calls already retrying.
        return self

    def call_with_retry(
        self,
        do: Callable[[], Any],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> Any:
        self._backoff.reset()
        failures, first_failure = 0, 0.0
        while True:
            try:
                result = do()
            except self._supported_errors as error:
                if is_retryable is not None and not is_retryable(error):
                    raise
                failures += 1
                if isinstance(error, redis.AuthenticationError):
                    # A restarted server takes a moment to get its users back; a revoked
                    # credential never will.
                    if failures == 1:
                        first_failure = time.monotonic()
                    if time.monotonic() - first_failure > min(self.limit_s, _AUTH_GRACE_S):
                        raise redis.AuthenticationError(
                            f"the buffer at {self.where} refused this client's credential "
                            f"({error}): it was revoked, or never issued"
                        ) from None
                fail(error, failures) if with_failure_count else fail(error)
                if failures == 1:
                    first_failure = time.monotonic()
                    log.warning("the buffer at %s did not answer (%s); retrying for up to "
                                "%gs", self.where, error, self.limit_s)  # fmt: skip
                elif time.monotonic() - first_failure > self.limit_s:
                    raise BufferUnreachable(
                        f"the buffer at {self.where} did not answer for {self.limit_s:g}s "
                        f"(buffer.outage_limit_s; last error: {error}); once it is back, "
                        "`--resume` continues the run"
                    ) from None
                time.sleep(self._backoff.compute(min(failures, 30)))  # 2**n stays a float
                continue
            if failures:
                log.info("the buffer at %s answers again after %.1fs", self.where,
                         time.monotonic() - first_failure)  # fmt: skip
            return result


class RedisServer:
    """A `redis-server` process owned by Relay; use as a context manager or start()/stop()."""

    def __init__(self, data_dir: Path, config: RedisServerConfig, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.config = config
        self.port = port
        self.password = secrets.token_urlsafe(24)
        """The default user's: the learner and the driver, who may do anything."""
        self.role_passwords = {role: secrets.token_urlsafe(24) for role in ROLES}
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        """How many times the supervisor started the server again after it died."""
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{self.host}:{self.port}/0"

    def url_for(self, role: str) -> str:
        """The URL of a restricted Redis user of `ROLES`: `dashboard` (reads only)."""
        return f"redis://{role}:{self.role_passwords[role]}@{self.host}:{self.port}/0"

    @property
    def host(self) -> str:
        """The address other processes (and other nodes) use to reach this server."""
        if self.config.advertise_host:
            return self.config.advertise_host
        if self.config.bind in ("0.0.0.0", "::"):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect(("10.255.255.255", 1))  # no packet is sent; picks the route
                return probe.getsockname()[0]
        return self.config.bind

    def start(self) -> RedisServer:
        """Start the server (reusing the AOF in `data_dir`) and wait until it answers."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerError(
                "redis-server is not installed: run `make setup` (installs Debian's "
                "redis-server) or `sudo apt-get install redis-server`, or set buffer.url"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._stop_leftover()
        self.port = self.port or free_port()
        conf = self.data_dir / "redis.conf"
        conf.write_text(self._config_text())
        conf.chmod(0o600)  # it holds the password
        self._launch(binary, conf)
        self._wait_until_ready()
        log.info("embedded redis-server on 127.0.0.1:%d (data in %s)", self.port, self.data_dir)
        return self

    def _launch(self, binary: str, conf: Path) -> None:
        # If the process that owns the server is killed outright, the server goes too
        # (SIGTERM: it still flushes the AOF) instead of lingering on the run's files.
        setpriv = shutil.which("setpriv")
        launcher = [setpriv, "--pdeathsig", "TERM"] if setpriv else []
        # Its own session: a terminal's Ctrl-C (SIGINT to the whole foreground process
        # group) must not stop the buffer under a run that is finishing its step.
        self.process = subprocess.Popen(
            [*launcher, binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip

    def supervise(self) -> RedisServer:
        """Restart the server whenever it dies (killed, crashed, OOM), on the same port with
        the same password, from its AOF, until `stop()`. Clients ride out the gap."""
        self._supervisor = threading.Thread(
            target=self._watch, name="redis-supervisor", daemon=True
        )
        self._supervisor.start()
        return self

    def _watch(self) -> None:
        binary, conf = shutil.which("redis-server"), self.data_dir / "redis.conf"
        wait = _BACKOFF_S[0]
        while not self._stopping.wait(0.1):
            if self.process.poll() is None:
                continue
            code = self.process.returncode
            log.warning("the embedded redis-server exited (%s); restarting it from its AOF",
                        f"signal {-code}" if code < 0 else f"exit code {code}")  # fmt: skip
            self.restarts += 1
            try:
                self._launch(binary, conf)
                self._wait_until_ready()
            except (RedisServerError, OSError) as error:
                log.error("could not restart redis-server: %s; trying again", error)
                self._stopping.wait(wait)
                wait = min(wait * 2, _BACKOFF_S[1])
                continue
            wait = _BACKOFF_S[0]
            log.warning("redis-server restarted on port %d (restart %d)", self.port, self.restarts)

    def stop(self) -> None:
        """Shut down with a final AOF flush; kill if it does not exit in time."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
        if self.process is None or self.process.poll() is not None:
            return
        # The shutdown closes the connection before replying.
        with contextlib.suppress(redis.ConnectionError):
            redis.Redis.from_url(self.url, socket_timeout=10, retry=_ONCE).shutdown(nosave=False)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _stop_leftover(self) -> None:
        """Stop a server a killed run left on this data directory, before reusing its AOF."""
        pidfile = self.data_dir / "redis.pid"
        try:
            pid = int(pidfile.read_text().strip())
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            directory = Path(f"/proc/{pid}/cwd").resolve(strict=True)
        except (OSError, ValueError):
            return
        # redis-server rewrites its command line, but works in its `dir`.
        if b"redis-server" not in command or directory != self.data_dir.resolve():
            return
        log.warning("a redis-server of a previous run (pid %d) still uses %s; stopping it",
                    pid, self.data_dir)  # fmt: skip
        os.kill(pid, signal.SIGTERM)
        if poll(lambda: None if Path(f"/proc/{pid}").exists() else True, 30, 0.1) is None:
            os.kill(pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (for failure tests)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def client(
        self, outage_limit_s: float = DEFAULT_OUTAGE_LIMIT_S, role: str | None = None
    ) -> redis.Redis:
        """A client as the default user, or as `role` (see `url_for`)."""
        return connect(self.url if role is None else self.url_for(role), outage_limit_s)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType]) -> None:
        self.stop()

    def _config_text(self) -> str:
        lines = [
            f"bind {self.config.bind}",
            f"port {self.port}",
            f"dir {self.data_dir.resolve()}",
            f"pidfile {self.data_dir.resolve() / 'redis.pid'}",
            f"requirepass {self.password}",
            *(f"user {role} on >{self.role_passwords[role]} {ROLES[role]}" for role in ROLES),
            "appendonly yes",
            f"appendfsync {self.config.appendfsync}",
            "save ''",
            "protected-mode yes",
            "daemonize no",
            "logfile ''",
        ]
        # Full memory refuses writes (producers see errors, the learner's acks and claims
        # still free memory) instead of evicting state: eviction could drop acked ids.
        lines.append("maxmemory-policy noeviction")
        if self.config.maxmemory_mib:
            lines.append(f"maxmemory {self.config.maxmemory_mib}mb")
        return "\n".join(lines) + "\n"

    def _wait_until_ready(self) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=10, retry=_ONCE)

        def answers() -> bool | None:
            if self.process.poll() is not None:
                error = self.process.stderr.read().decode(errors="replace").strip()
                raise RedisServerError(f"redis-server exited at start: {error[-500:]}")
            try:
                return client.ping() or None
            except (redis.ConnectionError, redis.BusyLoadingError):
                return None

        if poll(answers, self.config.start_timeout_s, 0.05):
            return
        self.kill()
        raise RedisServerError(f"redis-server did not answer within {self.config.start_timeout_s}s")


STOPPING_OUTAGE_LIMIT_S = 5.0


def shorten_outages(client: redis.Redis, limit_s: float = STOPPING_OUTAGE_LIMIT_S) -> None:
    """Ride out outages for at most `limit_s` from now on, calls already retrying included:
    a process that was asked to stop should not wait two minutes for a Redis that may have
    gone for good (the run it served ended)."""
    retry = client.get_retry()
    if isinstance(retry, RideOutOutages):
        retry.limit_s = min(retry.limit_s, limit_s)


def connect(
    url: str, outage_limit_s: float = DEFAULT_OUTAGE_LIMIT_S, socket_timeout_s: float = 60.0
) -> redis.Redis:
    """A client for the buffer's Redis: redis:// or rediss:// (TLS), password in the URL.

    It rides out outages (a restart, a network blip, a paused server) for up to
    `outage_limit_s`, then raises BufferUnreachable naming the server."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise RedisServerError(f"buffer.url {url!r} must start with redis://, rediss:// or unix://")
    # No Relay command blocks server-side, so a reply slower than this means a lost server:
    # fail with a timeout error (then retry) rather than hang.
    return redis.Redis.from_url(
        url, socket_timeout=socket_timeout_s, socket_connect_timeout=min(10.0, socket_timeout_s),
        retry=RideOutOutages(url.split("@")[-1], outage_limit_s),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )  # fmt: skip


def reach(url: str, outage_limit_s: float = DEFAULT_OUTAGE_LIMIT_S) -> redis.Redis:
    """`connect(url)` and check at once that the server answers; the error names the
    host, not the password."""
    client = connect(url, outage_limit_s)
    try:
        redis.Redis.from_url(url, socket_connect_timeout=10, retry=_ONCE).ping()
    except redis.RedisError as error:
        where = url.split("@")[-1]
        raise RedisServerError(f"cannot reach the buffer at {where}: {error}") from None
    return client


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def open_redis(
    url: str | None,
    server_config: RedisServerConfig,
    data_dir: Path,
    outage_limit_s: float = DEFAULT_OUTAGE_LIMIT_S,
) -> tuple[redis.Redis, RedisServer | None]:
    """Connect to `url`, or start a supervised embedded server in `data_dir` when it is None.

    Returns the client and the server to stop at the end (None for an external Redis).
    """
    if url is not None:
        return reach(url, outage_limit_s), None
    server = RedisServer(data_dir, server_config).start().supervise()
    return server.client(outage_limit_s), server
