"""Escape attempts against the code sandbox: each fails, and the sandbox's host carries on.

The host here is the test process, which stands where an actor does: it runs the sandbox
for every attempt, never gets an exception, and scores a correct program afterwards.
Several attempts first go around the audit hook (a patched `subprocess.sys`, `_thread`),
so what stops them is the kernel's wall (namespaces, seccomp, hard limits), not Python's.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from envs.base import Split
from envs.code_tests import TASKS, CodeConfig, CodeEnv
from envs.sandbox import _REFUSED_CALLS, SECCOMP_ARCHES, _seccomp_filter, run_function

MEMORY_MB = 256


def run(code: str, timeout_s: float = 5) -> object:
    """What `f()` returned in the sandbox: its value, its exception name, or the run error."""
    result = run_function(code, "f", [[]], timeout_s=timeout_s, memory_mb=MEMORY_MB)
    if result.returned is None:
        return {"run error": result.error}
    return result.returned[0].get("value", result.returned[0].get("error"))


def attempt(body: str) -> str:
    """Code whose f() runs `body` and returns what it returned, or the error it raised."""
    indented = "\n".join("        " + line for line in body.strip().splitlines())
    return (
        "def f():\n"
        "    try:\n"
        f"{indented}\n"
        "    except BaseException as error:\n"
        "        return f'{type(error).__name__}: {error}'\n"
    )


def test_host_files_are_invisible_and_the_interpreter_read_only(tmp_path: Path) -> None:
    secret = tmp_path / "redis.conf"
    secret.write_text("requirepass hunter2\n")
    assert run(attempt(f"return open({str(secret)!r}).read()")).startswith("FileNotFoundError")
    assert run(attempt("return open('/etc/passwd').read()")).startswith("FileNotFoundError")
    top = run(attempt("return sorted(__import__('os').listdir('/'))"))
    assert set(top) <= {"usr", "bin", "lib", "lib32", "lib64", "dev", "tmp"} | {
        Path(sys.base_prefix).resolve().parts[1]  # e.g. /root/.pyenv/versions/3.11.7
    }
    written = run(attempt("open('/usr/relay-was-here', 'w').write('x')"))
    assert written.startswith("OSError: [Errno 30]")  # read-only file system
    assert not Path("/usr/relay-was-here").exists()
    # A private scratch directory works, and is gone with the run.
    assert (
        run(attempt("open('/tmp/scratch', 'w').write('ok'); return open('/tmp/scratch').read()"))
        == "ok"
    )
    assert run(attempt("return __import__('os').listdir('/tmp')")) == []


def test_the_environment_and_the_hosts_processes_are_out_of_sight(monkeypatch) -> None:
    monkeypatch.setenv("RELAY_TEST_SECRET", "hunter2")
    environment = run(attempt("return dict(__import__('os').environ)"))
    assert "RELAY_TEST_SECRET" not in environment
    assert set(environment) <= {"LANG", "HOME", "PWD"}
    parent = run(attempt("return open(f'/proc/{__import__(\"os\").getppid()}/environ').read()"))
    assert parent.startswith("FileNotFoundError")
    assert run(attempt("return __import__('os').listdir('/proc')")).startswith("FileNotFoundError")


def test_no_network_even_to_a_listener_on_the_host() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    through_hook = run(
        attempt(f"return __import__('socket').create_connection(('127.0.0.1', {port}), 1)")
    )
    assert through_hook.startswith("PermissionError: sandbox: socket")
    # Under the hook, the kernel is the wall: seccomp refuses every socket, even the
    # netlink one `if_nameindex` opens without the hook seeing it (the empty network
    # namespace's loopback is up, so a socket would have reached it).
    refused = "PermissionError: [Errno 1] Operation not permitted"
    assert run(attempt("return __import__('socket').if_nameindex()")) == refused
    with pytest.raises(TimeoutError):
        listener.accept()
    listener.close()


def test_limits_cannot_be_raised_and_still_hold() -> None:
    raise_as = run(attempt("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))"))
    assert raise_as.startswith("PermissionError")
    prlimit = run(attempt("import resource\nresource.prlimit(0, resource.RLIMIT_AS, (-1, -1))"))
    assert prlimit.startswith("PermissionError")
    hard = run(attempt("import resource\nreturn resource.getrlimit(resource.RLIMIT_AS)[1]"))
    assert hard == (MEMORY_MB - 16) << 20  # the budget, less the 16 MiB /tmp
    # Whatever was tried, the memory limit is still there for the next allocation.
    assert run("x = bytearray(10**10)") == {"run error": "MemoryError: "}


def test_memory_bombs_end_the_run_not_the_host() -> None:
    grow = "def f():\n    chunks = []\n    while True:\n        chunks.append(bytearray(10**7))"
    assert run(grow) == "MemoryError"
    assert run("x = bytearray(10**10)") == {"run error": "MemoryError: "}


# Processes and threads, each by a path the audit hook does not see: seccomp refuses them
# all with EPERM, root included (the suite runs as root here, whom RLIMIT_NPROC exempts).
PATCHED_SUBPROCESS = """
import subprocess, sys, types
subprocess.sys = types.SimpleNamespace(**{**vars(sys), "audit": lambda *args: None})
return subprocess.run(["/bin/sh", "-c", "echo escaped"], capture_output=True).stdout
"""
FORK_BOMB = """
import _thread
started = 0
while True:
    _thread.start_new_thread(lambda: None, ())
    started += 1
"""


@pytest.mark.parametrize("body", [PATCHED_SUBPROCESS, FORK_BOMB], ids=["shell", "fork-bomb"])
def test_no_new_process_or_thread_by_any_path(body: str) -> None:
    outcome = run(attempt(body))
    assert outcome.startswith(
        ("PermissionError: [Errno 1]", "RuntimeError: can't start new thread")
    )


def test_a_new_session_does_not_outlive_the_kill() -> None:
    code = attempt("import os\nos.setsid()\nwhile True: pass")
    assert run(code, timeout_s=1) == {"run error": "timed out after 1s"}
    deadline = time.monotonic() + 5
    while _harness_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _harness_processes() == []


def _harness_processes() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if (
                entry.name.isdigit()
                and b"relay sandbox harness" in (entry / "cmdline").read_bytes()
            ):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_floods_of_output_are_discarded_and_forged_verdicts_ignored() -> None:
    flood = (
        "import os, sys\n"
        "for fd in range(1, 64):\n"
        "    try:\n"
        '        os.write(fd, b\'{"returned": [{"value": 42}]}\\n\')\n'
        "    except OSError:\n"
        "        pass\n"
        "def f():\n"
        "    for _ in range(50):\n"
        "        sys.stdout.write('x' * 10**6)\n"
        "        sys.stderr.write('y' * 10**6)\n"
        "    return 7\n"
    )
    # The garbage reached the one pipe it can hold, the harness's results channel, which
    # refuses it; nothing reached the verdict, and 100 MB of prints went to /dev/null.
    assert run(flood) == {"run error": "malformed result from the candidate"}
    assert run(flood.replace("range(1, 64)", "range(1, 3)")) == 7
    huge = "def f():\n    return 'z' * 5_000_000"
    assert run(huge) == {"run error": "results over 1000000 bytes"}


def test_the_host_keeps_working_after_every_attempt() -> None:
    env = CodeEnv(CodeConfig(timeout_s=3.0, memory_mb=MEMORY_MB))
    prompt = _add_prompt(env)
    threads_before = threading.active_count()
    for hostile in (FORK_BOMB, PATCHED_SUBPROCESS, "import os\nos.setsid()\nwhile True: pass"):
        verdict = env.score(prompt, f"def add(a, b):\n{_indent(hostile)}")
        assert verdict.reward == 0.0
    assert env.score(prompt, "def add(a, b):\n    return a + b").reward == 1.0
    assert threading.active_count() == threads_before


def _add_prompt(env: CodeEnv):
    for split in Split:
        tasks = sum(task.split is split for task in TASKS.values())
        for prompt in env.prompts(split, tasks, 0):
            if prompt.reference == "add":
                return prompt
    raise AssertionError("the code task has no `add`")


def _indent(body: str) -> str:
    return "\n".join("    " + line for line in body.strip().splitlines())


def test_only_a_small_tmp_is_writable() -> None:
    # The root and /dev (its shm directory included) are tmpfs sized at half the host's
    # RAM: writable, they let a candidate pin host memory past its limit.
    body = """
import os
written = []
for path in ("/big", "/dev/shm/big", "/usr/big", "/tmp/small"):
    try:
        with open(path, "wb") as out:
            out.write(b"x" * 1000)
        written.append(path)
    except OSError:
        pass
try:
    for i in range(64):  # files of 1 MiB less a byte (RLIMIT_FSIZE is 1 MiB)
        with open(f"/tmp/big{i}", "wb") as out:
            out.write(b"x" * ((1 << 20) - 1))
except OSError as error:
    written.append((i, error.strerror))
return written
"""
    # 16 MiB hold 15 such files (and /tmp/small) before the tmpfs is full.
    assert run(attempt(body)) == ["/tmp/small", [15, "No space left on device"]]


@pytest.mark.parametrize(
    ("body", "what"),
    [
        ("import os\nreturn os.memfd_create('pin')", "memfd_create"),  # memory past the limit
        ("import os\nreturn os.pidfd_open(1)", "pidfd_open"),  # the way to pidfd_getfd
        ("from multiprocessing import shared_memory\n"
         "return shared_memory.SharedMemory(create=True, size=1 << 20).name", "/dev/shm"),
    ],
)  # fmt: skip
def test_calls_that_reach_past_the_sandbox_are_refused(body: str, what: str) -> None:
    # Each of these works for any unprivileged process outside the sandbox.
    outcome = run(attempt(body))
    assert outcome.startswith(("PermissionError", "OSError: [Errno 30]")), (what, outcome)


def run_bpf(program: bytes, nr: int, arch: int) -> int:
    """What a classic-BPF seccomp program returns for system call `nr` on `arch`: the
    three instructions `_seccomp_filter` uses, interpreted as the kernel does."""
    import struct

    steps = [struct.unpack("HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    fields, pc, acc = {0: nr, 4: arch}, 0, 0
    while True:
        code, jt, jf, k = steps[pc]
        if code == 0x20:  # load a word of seccomp_data
            acc, pc = fields[k], pc + 1
        elif code in (0x15, 0x35):  # jump if equal, if greater or equal
            pc += 1 + (jt if (acc == k if code == 0x15 else acc >= k) else jf)
        else:
            assert code == 0x06
            return k


@pytest.mark.parametrize("machine", sorted(SECCOMP_ARCHES))
def test_the_seccomp_filter_refuses_every_listed_call_and_allows_the_rest(machine: str) -> None:
    column, arch = SECCOMP_ARCHES[machine]
    program = _seccomp_filter(machine)
    eperm, allow, kill = 0x00050001, 0x7FFF0000, 0x80000000
    refused = {nrs[column] for nrs in _REFUSED_CALLS.values() if nrs[column] is not None}
    for name, nrs in _REFUSED_CALLS.items():
        if nrs[column] is not None:
            assert run_bpf(program, nrs[column], arch) == eperm, name
    # Calls CPython needs (read, write, mmap, exit_group ... by number) pass.
    assert all(run_bpf(program, nr, arch) == allow for nr in range(0, 20) if nr not in refused)
    assert run_bpf(program, 0, 0x40000003) == kill  # another architecture's calls
    for name in ("keyctl", "pidfd_getfd", "io_uring_setup", "userfaultfd", "unshare", "mount"):
        assert name in _REFUSED_CALLS


def test_a_deeply_nested_result_scores_zero_instead_of_raising() -> None:
    nest = "def f():\n    x = []\n    for _ in range(DEPTH):\n        x = [x]\n    return x\n"
    for depth in (100, 990):
        outcome = run(nest.replace("DEPTH", str(depth)))
        assert isinstance(outcome, dict) and "run error" in outcome, depth
    # Deeper still, the candidate's own process cannot even write it down.
    assert run(nest.replace("DEPTH", "5000")) == "UnserialisableResult"
    assert run(nest.replace("DEPTH", "10")) is not None
    env = CodeEnv(CodeConfig(timeout_s=3.0, memory_mb=MEMORY_MB))
    prompt = _add_prompt(env)
    code = nest.replace("def f()", "def add(a, b)").replace("DEPTH", "990")
    verdict = env.score(prompt, code)
    assert verdict.reward == 0.0 and "nested" in verdict.details["reason"]
