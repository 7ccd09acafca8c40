"""Run untrusted Python in a subprocess with time, memory and output limits and no network.

The child (an isolated `python -I -S`) first drops its own privileges: resource limits,
a private network namespace when the kernel allows one, and an audit hook that refuses
sockets, new processes and `ctypes`. Only then does it execute the candidate code and
call the function on each case. Expected values never leave the parent, which compares
what the child returns: a program that prints "all tests passed" earns nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

_MAX_OUTPUT_BYTES = 1_000_000
_RESULT_MARKER = "__relay_sandbox_result__"

_HARNESS = r"""
import ctypes, io, json, os, resource, sys
request = json.loads(sys.stdin.read())
sys.stdin = io.StringIO("")
limit = request["memory_mb"] * 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
resource.setrlimit(resource.RLIMIT_CPU, (request["cpu_s"], request["cpu_s"] + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0)) if os.getuid() != 0 else None
network = "audit-hook"
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
if libc.unshare(CLONE_NEWNET) == 0 or libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
    network = "namespace"
# Forget ctypes so that a candidate's `import ctypes` is a real import the hook sees.
del libc, ctypes
for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
    del sys.modules[name]
BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.fork",
           "os.kill", "os.putenv", "ctypes.", "pty.", "resource.setrlimit")
def guard(event, args):
    if event.startswith(BLOCKED) or (event == "import" and args[0] in ("ctypes", "_ctypes")):
        raise PermissionError(f"sandbox: {event} is not allowed")
sys.addaudithook(guard)
results_fd = os.dup(1)
sys.stdout = io.StringIO()
outcome = {"network": network}
try:
    namespace = {"__name__": "candidate"}
    exec(compile(request["code"], "<candidate>", "exec"), namespace)
    function = namespace.get(request["function"])
    if not callable(function):
        outcome["error"] = f"no function named {request['function']}"
    else:
        returned = []
        for args in request["cases"]:
            try:
                returned.append({"value": function(*args)})
            except Exception as error:
                returned.append({"error": type(error).__name__})
        outcome["returned"] = returned
except BaseException as error:
    outcome["error"] = f"{type(error).__name__}: {str(error)[:200]}"
try:
    line = json.dumps(outcome, default=repr)
except (TypeError, ValueError) as error:
    line = json.dumps({"network": network, "error": f"unserialisable result: {error}"})
os.write(results_fd, ("\n" + MARKER + line + "\n").encode())
""".replace("MARKER", repr(_RESULT_MARKER))


@dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run returned: one entry per case, or an error for the whole run."""

    returned: list[dict[str, Any]] | None
    """Per case {"value": ...} or {"error": exception name}; None when the run failed."""
    error: str | None
    """Why the run failed as a whole (syntax error, timeout, memory, missing function)."""
    network_isolation: str
    """"namespace" (no network device at all) or "audit-hook" (socket calls refused)."""


def run_function(
    code: str,
    function: str,
    cases: list[list[Any]],
    *,
    timeout_s: float,
    memory_mb: int,
) -> SandboxResult:
    """Execute `code`, call `function(*case)` for every case, and return what came back."""
    request = json.dumps(
        {
            "code": code,
            "function": function,
            "cases": cases,
            "memory_mb": memory_mb,
            "cpu_s": max(1, int(timeout_s) + 1),
        }
    )
    with tempfile.TemporaryDirectory(prefix="relay-sandbox-") as workdir:
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _HARNESS],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            start_new_session=True,
        )
        try:
            stdout, _ = process.communicate(request.encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return SandboxResult(None, f"timed out after {timeout_s:g}s", "unknown")
    return _parse_outcome(stdout[-_MAX_OUTPUT_BYTES:], process.returncode)


def _parse_outcome(stdout: bytes, returncode: int) -> SandboxResult:
    # The harness writes its verdict last; anything the candidate printed comes before it.
    lines = stdout.decode("utf-8", errors="replace").splitlines()
    results = [line for line in lines if line.startswith(_RESULT_MARKER)]
    if not results:
        reason = "killed (CPU or memory limit)" if returncode < 0 else f"exit code {returncode}"
        return SandboxResult(None, f"no result: {reason}", "unknown")
    outcome = json.loads(results[-1][len(_RESULT_MARKER) :])
    return SandboxResult(outcome.get("returned"), outcome.get("error"), outcome["network"])
