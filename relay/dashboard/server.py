"""The dashboard's web server: one page that updates live, JSON, server-sent events and
Prometheus' `/metrics`, all from one `Watcher` polled in a background thread.

The page and its charting library (Chart.js, MIT) are served from this package: a run
on a closed network has no CDN to load them from.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import threading
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from relay.dashboard.config import LOOPBACK_HOSTS, DashboardConfig
from relay.dashboard.prometheus import exposition
from relay.dashboard.snapshot import Watcher
from relay.errors import RelayError

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
TOKEN_COOKIE = "relay_dashboard_token"
TOKEN_ENV = "RELAY_DASHBOARD_TOKEN"


class Dashboard:
    """Serves one experiment's figures; `start()` returns once it accepts connections."""

    def __init__(self, watcher: Watcher, config: DashboardConfig) -> None:
        self.watcher = watcher
        self.config = config
        self.token = _resolve_token(config)
        self.url = ""
        self._lock = threading.Lock()
        self._polled = False
        self._error = ""
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = None

    def start(self) -> Dashboard:
        self.refresh()
        sock = _listen(self.config.host, self.config.port)
        host, port = sock.getsockname()[:2]
        shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.url = f"http://{shown_host}:{port}/"
        self._server = uvicorn.Server(
            uvicorn.Config(
                create_app(self), log_level="warning", access_log=False,
                timeout_graceful_shutdown=2, lifespan="off",
            )
        )  # fmt: skip
        self._threads = [
            threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                             name="relay-dashboard", daemon=True),
            threading.Thread(target=self._poll_forever, name="relay-dashboard-poll", daemon=True),
        ]  # fmt: skip
        for thread in self._threads:
            thread.start()
        while not self._server.started:
            if not self._threads[0].is_alive():
                raise RelayError(f"the dashboard did not start on {host}:{port}; see the log")
            self._stopping.wait(0.05)
        shown = self.url + (f"?token={self.token}" if self.token else "")
        log.info("dashboard at %s (Prometheus: %smetrics)", shown, self.url)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.should_exit = True
        for thread in self._threads:
            thread.join(timeout=10)

    def refresh(self) -> None:
        """Poll the buffer now; on failure keep the last figures and say why."""
        try:
            self.watcher.read()  # rendered per request by current()
            error = ""
        except Exception as failure:  # Redis gone or restarting: the page says so and waits
            error = f"cannot read the buffer: {failure}"
            log.debug("dashboard poll failed", exc_info=True)
        with self._lock:
            self._polled = self._polled or not error
            self._error = error

    def current(self, history_since: float | None = None) -> dict:
        """The latest snapshot (learner history after `history_since`) and the poll error."""
        with self._lock:
            polled, error = self._polled, self._error
        if not polled:
            return {"error": error or "no figures yet"}
        return {**self.watcher.snapshot(history_since=history_since), "error": error}

    def _poll_forever(self) -> None:
        while not self._stopping.wait(self.config.refresh_s):
            self.refresh()


def create_app(dashboard: Dashboard) -> FastAPI:
    """The FastAPI application; every route requires the token when there is one."""
    app = FastAPI(title="Relay dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    token = dashboard.token

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if token is None:
            return await call_next(request)
        offered = (
            request.query_params.get("token")
            or request.cookies.get(TOKEN_COOKIE)
            or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        )
        if not secrets.compare_digest(offered.encode(), token.encode()):
            return JSONResponse(
                {"error": "this dashboard requires its token: open /?token=... or send "
                          "'Authorization: Bearer ...' (dashboard.token, $RELAY_DASHBOARD_TOKEN)"},
                status_code=401,
            )  # fmt: skip
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/snapshot")
    def snapshot() -> JSONResponse:
        return JSONResponse(dashboard.current())

    @app.get("/api/events")
    async def events(request: Request) -> StreamingResponse:
        async def stream():
            # The first event carries the whole history; later ones only what is new.
            since = None
            while not dashboard._stopping.is_set() and not await request.is_disconnected():
                snapshot = dashboard.current(history_since=since)
                history = snapshot.get("learner_history") or []
                if history:
                    since = history[-1]["time"]
                elif since is None and "taken_at" in snapshot:
                    since = 0.0
                yield f"data: {json.dumps(snapshot)}\n\n"
                await asyncio.sleep(dashboard.config.refresh_s)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/metrics")
    def metrics() -> Response:
        current = dashboard.current()
        if "buffer" not in current:
            return Response(current["error"] + "\n", status_code=503, media_type="text/plain")
        return Response(exposition(current), media_type="text/plain; version=0.0.4")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _resolve_token(config: DashboardConfig) -> str | None:
    token = config.token or os.environ.get(TOKEN_ENV) or None
    if token is None and config.host not in LOOPBACK_HOSTS:
        token = secrets.token_urlsafe(18)
        log.warning("dashboard.host is %s and no token was set: generated one", config.host)
    return token


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); the default port falls back to a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        if error.errno != errno.EADDRINUSE or port != DashboardConfig().port:
            sock.close()
            raise RelayError(f"dashboard.port {port} on {host}: {error.strerror}") from None
        log.warning("dashboard port %d is in use; using a free port instead", port)
        sock.bind((host, 0))
    sock.listen(64)
    sock.set_inheritable(False)
    return sock


@contextlib.contextmanager
def serving(watcher: Watcher, config: DashboardConfig):
    """The dashboard for the duration of a `with` block."""
    dashboard = Dashboard(watcher, config).start()
    try:
        yield dashboard
    finally:
        dashboard.stop()
