"""Configuration of the live dashboard (`relay dashboard`, and inside `relay run`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class DashboardConfig(BaseModel):
    """The web page, `/metrics` endpoint and their poll of the buffer."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = True
    """`relay run` serves the dashboard while it runs."""
    host: str = "127.0.0.1"
    """Listen address. Anything but loopback requires a token."""
    port: int = Field(8420, ge=0, le=65535)
    """Listen port; 0 picks a free one. A busy default port falls back to a free one."""
    token: str | None = None
    """Required on every request when set (Bearer header, `?token=` or the cookie the page
    sets). Off loopback, None means the RELAY_DASHBOARD_TOKEN environment variable or, if
    that is unset, a generated token printed with the URL."""
    refresh_s: float = Field(2.0, gt=0)
    """How often the buffer is read and the page updated."""
