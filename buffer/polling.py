"""One way to wait for something in Redis (or anywhere): ask again until it is there."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(
    attempt: Callable[[], T | None],
    timeout_s: float,
    every_s: float = 0.2,
    longest_s: float | None = None,
) -> T | None:
    """Call `attempt` until it returns something other than None, at least once; its value,
    or None when `timeout_s` passed. Waits `every_s` between calls, doubling up to
    `longest_s` when that is given, and never sleeps past the deadline."""
    deadline = time.monotonic() + timeout_s
    wait = every_s
    while True:
        value = attempt()
        if value is not None:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(wait, left))
        if longest_s is not None:
            wait = min(wait * 2, longest_s)
