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
from envs.sandbox import run_function

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
    # Under the hook, the network namespace is the wall: its one device is a loopback
    # of its own, so even a socket the hook missed would reach nothing of the host's.
    assert run(attempt("return __import__('socket').if_nameindex()")) == [[1, "lo"]]
    with pytest.raises(TimeoutError):
        listener.accept()
    listener.close()


def test_limits_cannot_be_raised_and_still_hold() -> None:
    raise_as = run(attempt("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))"))
    assert raise_as.startswith("PermissionError")
    prlimit = run(attempt("import resource\nresource.prlimit(0, resource.RLIMIT_AS, (-1, -1))"))
    assert prlimit.startswith("PermissionError")
    hard = run(attempt("import resource\nreturn resource.getrlimit(resource.RLIMIT_AS)[1]"))
    assert hard == MEMORY_MB << 20
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
