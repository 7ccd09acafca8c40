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
_MAX_RESULT_DEPTH = 64
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
    except (ValueError, RecursionError):
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


# The system calls the candidate is refused (EPERM), by name, with their numbers on
# x86_64 and aarch64. A denylist, not an allowlist: CPython's own needs differ between
# versions and libcs, and a call it needs and misses would fail every candidate. These are
# the ways out: new processes or threads; tracing or reaching into another process (the
# harness's pipe by pidfd_getfd); sockets (loopback is up in the empty network namespace);
# memory outside the process's own limit (SysV IPC, memfd); kernel keyrings; namespaces
# and mounts; io_uring, userfaultfd, BPF and perf (large kernel attack surface); and the
# administrative calls an unprivileged process has no use for.
_REFUSED_CALLS = {
    "clone": (56, 220), "fork": (57, None), "vfork": (58, None), "clone3": (435, 435),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "kcmp": (312, 272), "pidfd_open": (434, 434), "pidfd_getfd": (438, 438),
    "pidfd_send_signal": (424, 424), "process_madvise": (440, 440),
    "socket": (41, 198), "socketpair": (53, 199),
    "shmget": (29, 194), "shmat": (30, 196), "shmctl": (31, 195), "semget": (64, 190),
    "semop": (65, 193), "semctl": (66, 191), "semtimedop": (220, 192), "msgget": (68, 186),
    "msgsnd": (69, 189), "msgrcv": (70, 188), "msgctl": (71, 187),
    "memfd_create": (319, 279), "memfd_secret": (447, 447),
    "add_key": (248, 217), "request_key": (249, 218), "keyctl": (250, 219),
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "chroot": (161, 51), "open_tree": (428, 428),
    "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431),
    "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    "name_to_handle_at": (303, 264), "open_by_handle_at": (304, 265),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "userfaultfd": (323, 282), "bpf": (321, 280),
    "perf_event_open": (298, 241), "fanotify_init": (300, 262),
    "personality": (135, 92), "syslog": (103, 116), "acct": (163, 89),
    "swapon": (167, 224), "swapoff": (168, 225), "reboot": (169, 142),
    "quotactl": (179, 60), "settimeofday": (164, 170), "clock_settime": (227, 112),
    "clock_adjtime": (305, 266), "adjtimex": (159, 171), "sethostname": (170, 161),
    "setdomainname": (171, 162), "vhangup": (153, 58), "kexec_load": (246, 104),
    "kexec_file_load": (320, 294), "init_module": (175, 105), "finit_module": (313, 273),
    "delete_module": (176, 106), "iopl": (172, None), "ioperm": (173, None),
}  # fmt: skip


SECCOMP_ARCHES = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}
"""Machines the filter knows: the column of `_REFUSED_CALLS`, and the kernel's AUDIT_ARCH."""


def _seccomp_filter(machine: str | None = None) -> bytes:
    """A classic-BPF seccomp program: EPERM for every call in `_REFUSED_CALLS`, everything
    else allowed. Other architectures are killed outright rather than let through."""
    import platform
    import struct

    column, arch = SECCOMP_ARCHES[machine or platform.machine()]
    calls = sorted({nrs[column] for nrs in _REFUSED_CALLS.values() if nrs[column] is not None})
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
        preexec_fn=functools.partial(
            _set_hard_limits, max(memory_mb << 20, 2 * _SCRATCH_BYTES) - _SCRATCH_BYTES, cpu_s
        ),
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
    # Only /tmp is writable (a tmpfs of _SCRATCH_BYTES, counted in the memory budget):
    # the root and /dev (its shm directory included) are tmpfs too, sized by the kernel at
    # half the host's RAM, so they are made read-only.
    command += ["--dev", "/dev", "--remount-ro", "/dev"]
    command += ["--size", str(_SCRATCH_BYTES), "--tmpfs", "/tmp", "--chdir", "/tmp"]
    command += ["--remount-ro", "/"]
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
    """The harness's one JSON verdict; anything else is a failed run, never an exception.
    What the candidate returned is read within bounds: size (the harness's), and nesting."""
    try:
        verdict = json.loads(stdout[: 2 * _MAX_RESULT_BYTES])
    except RecursionError:
        return SandboxResult(None, f"result nested deeper than {_MAX_RESULT_DEPTH} levels")
    except ValueError:
        verdict = None
    if not isinstance(verdict, dict):
        reason = "killed (CPU or memory limit)" if returncode < 0 else f"exit code {returncode}"
        return SandboxResult(None, f"no result: {reason}")
    if isinstance(verdict.get("returned"), list):
        if _depth(verdict["returned"]) > _MAX_RESULT_DEPTH:
            return SandboxResult(None, f"result nested deeper than {_MAX_RESULT_DEPTH} levels")
        return SandboxResult(verdict["returned"], None)
    return SandboxResult(None, str(verdict.get("error", "malformed verdict"))[:500])


def _depth(value: object) -> int:
    """How deeply lists and dicts nest in `value` (iteratively: no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, level)
            stack.extend(
                (child, level + 1) for child in (item.values() if isinstance(item, dict) else item)
            )
    return deepest
