"""The terminal shows Relay's progress and warnings; everything else goes to the run's log.

vLLM's engine processes, Ray, DeepSpeed, C++ libraries and progress bars all write to the
process's standard streams, and the processes Relay starts inherit them. `quiet_terminal`
points file descriptors 1 and 2 at a log file, so all of that lands there, and hands back
the real terminal for Relay's own output: a Rich console, and a stream for results. Log
records of Relay's packages go to both; other libraries' records only to the file.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.logging import RichHandler

RELAY_PACKAGES = ("relay", "actors", "learner", "buffer", "envs")
"""Loggers whose records the terminal shows (INFO and above)."""


@dataclass(frozen=True)
class Terminal:
    """Where Relay's own output goes: progress and log lines, and results for scripts."""

    console: Console
    """The terminal's stderr: log lines, progress bars, one-line errors."""
    out: TextIO
    """The terminal's stdout: results a script may read."""
    log_file: Path | None = None
    """Where everything else is written (None: nothing is redirected)."""


def plain_terminal() -> Terminal:
    """The process's own streams, with Relay's log lines on stderr."""
    console = Console(stderr=True, soft_wrap=True)
    _configure_logging(console, None)
    return Terminal(console, sys.stdout)


def quiet_terminal(log_file: Path) -> Terminal:
    """Send fds 1 and 2 (and so every subprocess started from now on) to `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    terminal_out = os.fdopen(os.dup(1), "w", buffering=1)
    terminal_err = os.fdopen(os.dup(2), "w", buffering=1)
    target = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(target, 1)
    os.dup2(target, 2)
    os.close(target)
    console = Console(file=terminal_err, soft_wrap=True, force_terminal=terminal_err.isatty())
    _configure_logging(console, log_file)
    return Terminal(console, terminal_out, log_file)


def _configure_logging(console: Console, log_file: Path | None) -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    shown = RichHandler(console=console, show_path=False)
    shown.setFormatter(logging.Formatter("%(message)s"))
    if log_file is not None:
        shown.addFilter(_is_relays)
        # The file is fd 2 now: a stream handler on sys.stderr writes there.
        written = logging.StreamHandler(sys.stderr)
        written.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(written)
    root.addHandler(shown)


def _is_relays(record: logging.LogRecord) -> bool:
    return record.name.split(".", 1)[0] in RELAY_PACKAGES
