"""Run untrusted Python inside bubblewrap: no network, no host files, limits it cannot raise.

Each run is a fresh `bwrap` with every namespace unshared (user, PID, network, mount, IPC,
UTS, cgroup) and this filesystem: the interpreter's directories read-only, a small private
tmpfs as `/tmp`, a minimal `/dev`, and nothing else (no `/proc`, `/etc` or home). The
environment is empty. Hard resource limits (memory, CPU, file size, open files) are set
before `bwrap` starts, so nothing inside can raise them. When the run ends or times out,
killing `bwrap` kills its PID namespace, so nothing survives, whatever sessions it made.

Inside, a trusted harness forks the candidate's process, which installs a seccomp filter
that refuses every new process or thread and any tracing (root included, whom the kernel's
process limit exempts), sends its own output to `/dev/null`, installs an audit hook that
refuses sockets, processes and `ctypes` as a second wall, and only then runs the code. It
sends one JSON line per case to the harness over a pipe; the harness reads at most
`_MAX_RESULT_BYTES`, checks every line's shape, and alone writes the verdict to the parent.
The candidate never holds the parent's pipe, so it cannot print or forge the verdict, and
expected values never leave the parent, which compares what came back.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from envs.base import EnvError

_MAX_RESULT_BYTES = 1_000_000
_MAX_FILE_BYTES = 1 << 20
_SCRATCH_BYTES = 16 << 20
_MAX_OPEN_FILES = 64

_HARNESS = r"""# relay sandbox harness
import json, os, resource, sys
request = json.loads(sys.stdin.buffer.read())
read_end, write_end = os.pipe()
child = os.fork()
if child == 0:
    os.close(read_end)
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
    program = Program(len(SECCOMP) // 8, SECCOMP)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(program), 0, 0) != 0:
        os._exit(70)  # no seccomp filter: run nothing rather than run it unconfined
    del libc, Program, program, ctypes
    channel = os.fdopen(write_end, "w")
    def send(entry):
        try:
            line = json.dumps(entry, default=repr)
        except (TypeError, ValueError, RecursionError):
            line = json.dumps({"error": "UnserialisableResult"})
        channel.write(line + "\n")
        channel.flush()
    for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]
    BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.fork",
               "os.kill", "os.putenv", "ctypes.", "pty.", "resource.setrlimit", "resource.prlimit")
    def guard(event, args):
        if event.startswith(BLOCKED) or (event == "import" and args[0] in ("ctypes", "_ctypes")):
            raise PermissionError(f"sandbox: {event} is not allowed")
    sys.addaudithook(guard)
    try:
        namespace = {"__name__": "candidate"}
        exec(compile(request["code"], "<candidate>", "exec"), namespace)
        function = namespace.get(request["function"])
        if not callable(function):
            send({"fatal": f"no function named {request['function']}"})
        else:
            for args in request["cases"]:
                try:
                    send({"value": function(*args)})
                except Exception as error:
                    send({"error": type(error).__name__})
    except BaseException as error:
        send({"fatal": f"{type(error).__name__}: {str(error)[:200]}"})
    os._exit(0)
os.close(write_end)
received, returned, fatal, size = b"", [], None, 0
while True:
    chunk = os.read(read_end, 65536)
    if not chunk:
        break
    size += len(chunk)
    if size > MAX_BYTES:
        os.kill(child, 9)
        fatal = f"results over {MAX_BYTES} bytes"
        break
    received += chunk
_, status = os.waitpid(child, 0)
for line in received.split(b"\n")[:-1]:
    try:
        entry = json.loads(line)
    except ValueError:
        entry = None
    if isinstance(entry, dict) and set(entry) == {"fatal"} and fatal is None:
        fatal = str(entry["fatal"])
    elif isinstance(entry, dict) and (set(entry) == {"value"} or (
            set(entry) == {"error"} and isinstance(entry["error"], str))):
        returned.append(entry)
    elif fatal is None:
        fatal = "malformed result from the candidate"
if fatal is None and len(returned) != len(request["cases"]):
    if os.WIFSIGNALED(status):
        fatal = "killed (CPU or memory limit)"
    else:
        fatal = f"{len(returned)} results for {len(request['cases'])} cases"
verdict = {"error": fatal} if fatal is not None else {"returned": returned}
os.write(1, json.dumps(verdict).encode())
""".replace("MAX_BYTES", str(_MAX_RESULT_BYTES))


def _seccomp_filter() -> bytes:
    """A classic-BPF seccomp program: EPERM for every way to make a process or thread,
    to trace or poke another one; everything else allowed. Unknown architectures are
    refused outright rather than let through."""
    import platform
    import struct

    arch, calls = {
        "x86_64": (0xC000003E, (56, 57, 58, 435, 101, 310, 311)),  # clone fork vfork clone3
        "aarch64": (0xC00000B7, (220, 435, 117, 270, 271)),  # ptrace process_vm_readv/writev
    }[platform.machine()]
    load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, deny, kill = 0x7FFF0000, 0x00050000 | 1, 0x80000000
    steps = [(load, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (load, 0, 0, 0)]
    steps.append((jge, len(calls) + 1, 0, 0x40000000))  # x32 system calls: refused
    steps += [(jeq, len(calls) - i, 0, nr) for i, nr in enumerate(calls)]
    steps += [(ret, 0, 0, allow), (ret, 0, 0, deny)]
    return b"".join(struct.pack("HBBI", *step) for step in steps)


_HARNESS = _HARNESS.replace("SECCOMP", repr(_seccomp_filter()))


class SandboxUnavailable(EnvError):
    """This machine cannot isolate untrusted code (no bubblewrap, or no user namespaces)."""


@dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run returned: one entry per case, or an error for the whole run."""

    returned: list[dict[str, Any]] | None
    """Per case {"value": ...} or {"error": exception name}; None when the run failed."""
    error: str | None
    """Why the run failed as a whole (syntax error, timeout, memory, missing function)."""


def require_sandbox() -> None:
    """Raise SandboxUnavailable, saying what to install or enable, unless isolation works."""
    problem = _sandbox_problem()
    if problem:
        raise SandboxUnavailable(problem)


@functools.cache
def _sandbox_problem() -> str | None:
    if shutil.which("bwrap") is None:
        return (
            "the code sandbox needs bubblewrap (`bwrap`), which is not installed: "
            "`apt-get install bubblewrap` (Debian/Ubuntu) or `dnf install bubblewrap`"
        )
    try:
        probe = subprocess.run(
            [*_bwrap_command(), "-c", "pass"],
            capture_output=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return "the code sandbox's start-up probe (`bwrap ... python -c pass`) hung for 30 s"
    if probe.returncode != 0:
        reason = probe.stderr.decode(errors="replace").strip()[-300:]
        return (
            f"the code sandbox cannot start: bwrap says {reason!r}. It needs unprivileged "
            "user namespaces (sysctl kernel.unprivileged_userns_clone=1; in a container, "
            "a seccomp profile that allows unshare/clone, e.g. Docker's --security-opt "
            "seccomp=unconfined)"
        )
    return None


def run_function(
    code: str,
    function: str,
    cases: list[list[Any]],
    *,
    timeout_s: float,
    memory_mb: int,
) -> SandboxResult:
    """Execute `code`, call `function(*case)` for every case, and return what came back."""
    require_sandbox()
    request = json.dumps({"code": code, "function": function, "cases": cases})
    cpu_s = max(1, int(timeout_s) + 1)
    process = subprocess.Popen(
        [*_bwrap_command(), "-c", _HARNESS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={},
        start_new_session=True,
        preexec_fn=functools.partial(_set_hard_limits, memory_mb << 20, cpu_s),
    )
    try:
        stdout, _ = process.communicate(request.encode(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # bwrap dies, its init gets PDEATHSIG, and the kernel kills the whole PID namespace.
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=10)
        return SandboxResult(None, f"timed out after {timeout_s:g}s")
    return _parse_verdict(stdout, process.returncode)


def _bwrap_command() -> list[str]:
    """bwrap with every namespace new and only the interpreter visible, ending in python."""
    command = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    command += ["--clearenv", "--setenv", "LANG", "C.UTF-8", "--setenv", "HOME", "/tmp"]
    for path in _interpreter_paths():
        if os.path.islink(path):
            command += ["--symlink", os.readlink(path), path]
        else:
            command += ["--ro-bind", path, path]
    command += [
        "--dev",
        "/dev",
        "--size",
        str(_SCRATCH_BYTES),
        "--tmpfs",
        "/tmp",
        "--chdir",
        "/tmp",
    ]
    return [*command, "--", os.path.realpath(sys.executable), "-I", "-S"]


def _interpreter_paths() -> list[str]:
    """The system directories the interpreter and its shared libraries live in."""
    paths = [p for p in ("/usr", "/bin", "/lib", "/lib32", "/lib64") if os.path.lexists(p)]
    for prefix in {
        os.path.realpath(sys.base_prefix),
        os.path.dirname(os.path.realpath(sys.executable)),
    }:
        if not any(prefix == p or prefix.startswith(p + "/") for p in paths):
            paths.append(prefix)
    return paths


def _set_hard_limits(memory_bytes: int, cpu_s: int) -> None:
    # Runs in the child before exec: hard limits nothing inside the sandbox can raise.
    for limit, value in (
        (resource.RLIMIT_AS, memory_bytes),
        (resource.RLIMIT_CPU, cpu_s),
        (resource.RLIMIT_FSIZE, _MAX_FILE_BYTES),
        (resource.RLIMIT_NOFILE, _MAX_OPEN_FILES),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(limit, (value, value))


def _parse_verdict(stdout: bytes, returncode: int) -> SandboxResult:
    """The harness's one JSON verdict; anything else is a failed run, never an exception."""
    try:
        verdict = json.loads(stdout[: 2 * _MAX_RESULT_BYTES])
    except ValueError:
        verdict = None
    if not isinstance(verdict, dict):
        reason = "killed (CPU or memory limit)" if returncode < 0 else f"exit code {returncode}"
        return SandboxResult(None, f"no result: {reason}")
    if isinstance(verdict.get("returned"), list):
        return SandboxResult(verdict["returned"], None)
    return SandboxResult(None, str(verdict.get("error", "malformed verdict")))
