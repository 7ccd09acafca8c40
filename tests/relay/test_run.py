"""`relay run` end to end on this machine: embedded Redis, local Ray, a vLLM actor, the
DeepSpeed learner, evaluation on vLLM; asynchronous and synchronous schedules.

Runs the command as a user does (a process), then checks what it leaves behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
RELAY = str(Path(sys.executable).parent / "relay")
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
STEPS, BATCH = 6, 4


def run_config(tmp_path: Path, model: Path, mode: str, steps: int = STEPS, **sections) -> Path:
    config = tmp_path / f"{mode}.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / mode), "mode": mode, "model": {"path": str(model)},
        "env": {"type": "arithmetic"}, "engine": {"max_model_len": 64},
        "actors": {"group_size": 4, "groups_in_flight": 4, "sampling": {"max_tokens": 6},
                   "metrics_every_s": 0.5},
        "learner": {"steps": steps, "batch_groups": BATCH, "checkpoint": {"every_steps": 3},
                    "sample_timeout_s": 120},
        "eval": {"n_prompts": 20, "max_tokens": 6, "before": mode == "async",
                 "every_steps": 3, "in_run_prompts": 10},
        "ray": {"num_cpus": 2},
        **sections,
    }))  # fmt: skip
    return config


def start_relay_run(config: Path, *args: str) -> tuple[subprocess.Popen, Path, Path]:
    """`relay run` as a process; its stdout and stderr go to files beside the config (a
    pipe nobody reads while the run logs would fill up and block it)."""
    command = [RELAY, "run", "-c", str(config), *args]
    out, err = config.with_suffix(".out"), config.with_suffix(".err")
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(command, env=ENV, stdout=stdout, stderr=stderr, text=True)
    return process, out, err


def relay_run(
    config: Path, *args: str, watch: bool = False
) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run `relay run`; with `watch`, also read the run's figures with `relay status`
    (which finds the embedded Redis through run_dir) while the learner is training."""
    process, out, err = start_relay_run(config, *args)
    status = None
    metrics = Path(yaml.safe_load(config.read_text())["run_dir"]) / "metrics.jsonl"
    deadline = time.monotonic() + 900
    while watch and status is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
        if metrics.is_file() and metrics.read_text().strip():
            shown = subprocess.run([RELAY, "status", "--json", "-c", str(config)], env=ENV,
                                   capture_output=True, text=True, timeout=60)  # fmt: skip
            if shown.returncode != 0 and process.poll() is not None:
                break  # the run ended meanwhile: its own exit code and stderr tell why
            assert shown.returncode == 0, shown.stderr
            status = json.loads(shown.stdout)
    process.wait(timeout=max(1.0, deadline - time.monotonic()))
    return subprocess.CompletedProcess(
        process.args, process.returncode, out.read_text(), err.read_text()
    ), status


def leftover_processes(marker: str) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if marker in line and "ps -eo" not in line]


def processes_working_in(directory: Path) -> list[int]:
    """Processes whose working directory is inside `directory` (redis-server works in its
    data directory and rewrites its command line, so `ps` does not show the path)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cwd = (proc / "cwd").resolve(strict=True) if proc.name.isdigit() else None
        except OSError:
            continue
        if cwd is not None and (cwd == directory or directory in cwd.parents):
            found.append(int(proc.name))
    return found


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_relay_run_trains_on_rollouts_and_cleans_up(
    mode: str, warm_model_dir: Path, tmp_path: Path
) -> None:
    engines_before = len(leftover_processes("EngineCore"))
    config = run_config(tmp_path, warm_model_dir, mode)
    done, status = relay_run(config, watch=mode == "async")
    assert done.returncode == 0, done.stderr[-4000:]
    if mode == "async":  # the dashboard's figures, read while the run went on
        assert status is not None, "`relay status` never read the run while it trained"
        assert status["learner"]["step"] >= 1
        assert status["buffer"]["counters"]["put"] >= BATCH
        assert [a["actor_id"] for a in status["actors"]] == ["actor-0"]
        assert "dashboard at http://127.0.0.1:" in done.stderr
    run_dir = tmp_path / mode
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == STEPS and results["version"] == STEPS
    assert results["trained_groups"] == STEPS * BATCH
    assert 0.0 <= results["after"]["accuracy"] <= 1.0
    assert ("before" in results) == (mode == "async")
    if mode == "async":  # scored by the first actor, on its engine, before it generated
        assert results["before"]["n_prompts"] == 20
        assert "held-out accuracy before" in done.stdout
    assert "held-out accuracy after" in done.stdout

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["groups"] == BATCH for r in rows)
    assert "eval/greedy_accuracy" in rows[2] and "eval/greedy_accuracy" in rows[5]
    staleness = [r["learner/sampled_staleness_max"] for r in rows]
    if mode == "sync":
        assert staleness == [0.0] * STEPS  # on-policy: every batch from the current version
    else:
        assert max(staleness) <= 4  # buffer.max_staleness (default 4)
    health = results["actors"]["actor-0"]
    assert health["groups"] >= STEPS * BATCH and health["version"] >= 1
    assert (run_dir / "policy" / "model.safetensors").is_file()

    # Nothing left running: the embedded redis-server (its files live in run_dir) and
    # the actors' vLLM engine processes are gone (the session's own engine may remain).
    assert processes_working_in(run_dir) == [] and leftover_processes(str(run_dir)) == []
    assert len(leftover_processes("EngineCore")) == engines_before


def test_relay_run_resumes_after_the_driver_is_killed(warm_model_dir: Path, tmp_path: Path) -> None:
    steps = 12
    config = run_config(
        tmp_path, warm_model_dir, "async", steps=steps,
        eval={"n_prompts": 20, "max_tokens": 6, "before": False},
    )  # fmt: skip
    run_dir = tmp_path / "async"
    metrics = run_dir / "metrics.jsonl"
    process, _, err = start_relay_run(config)
    deadline = time.monotonic() + 600
    # Killed outright (as by the OOM killer) after the checkpoint at step 3.
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5):
        assert process.poll() is None, err.read_text()[-4000:]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.1)
    process.kill()
    process.wait()
    before = [json.loads(line) for line in metrics.read_text().splitlines()]

    # The embedded redis-server goes with its owner (its AOF stays in run_dir).
    deadline = time.monotonic() + 30
    while processes_working_in(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_working_in(run_dir) == []
    refused = subprocess.run([RELAY, "run", "-c", str(config)], env=ENV, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 1 and "--resume" in refused.stderr

    done, _ = relay_run(config, "--resume")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "resumed at step" in done.stderr
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    crashed_at, resumed = len(before), rows[len(before) :]
    checkpoint = resumed[0]["step"] - 1
    assert checkpoint % 3 == 0 and 3 <= checkpoint <= crashed_at
    assert [r["step"] for r in resumed] == list(range(checkpoint + 1, steps + 1))
    # Versions never repeat: the resumed learner publishes above all it published before.
    assert resumed[0]["version"] > max(r["version"] for r in before)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == steps and results["version"] == rows[-1]["version"]
    assert results["trained_groups"] == steps * BATCH  # each step's batch counted once
    assert processes_working_in(run_dir) == []


def test_actors_from_elsewhere_join_a_learner_only_run(
    warm_model_dir: Path, tmp_path: Path
) -> None:
    # The learning cluster runs no actors; an actor pool elsewhere (here: another process,
    # outside Ray) joins with nothing but a credential's URL, which the operator issues
    # with the admin URL `relay run` leaves in run_dir for its embedded Redis.
    steps = 4
    config = run_config(
        tmp_path, warm_model_dir, "async", steps=steps,
        actors={"num_actors": 0, "group_size": 4, "groups_in_flight": 4,
                "sampling": {"max_tokens": 6}},
        eval={"n_prompts": 20, "max_tokens": 6, "before": False},
    )  # fmt: skip
    run_dir = tmp_path / "async"
    process, _, err = start_relay_run(config)
    url_file = run_dir / "buffer.url"
    deadline = time.monotonic() + 300
    while not url_file.is_file():
        assert process.poll() is None, err.read_text()[-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    issued = subprocess.run(
        [RELAY, "actor-credential", "create", "pool", "--buffer", url_file.read_text().strip(),
         "--prefix", "relay"],
        env=ENV, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    with (tmp_path / "actor.log").open("w") as actor_log:
        actor = subprocess.Popen(
            [RELAY, "actor", "--buffer", issued.stdout.split()[-1], "--prefix", "relay",
             "--actor-id", "elsewhere-0", "--cache", str(tmp_path / "cache")],
            env=ENV, stdout=actor_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        process.wait(timeout=600)
    finally:
        actor.send_signal(signal.SIGTERM)
        actor.wait(timeout=120)
    assert process.returncode == 0, err.read_text()[-4000:]
    assert "waiting for actors to join" in err.read_text()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == steps and results["trained_groups"] == steps * BATCH
    assert results["actors"] == {}
    # Every trained group came from the actor that joined.
    assert "elsewhere-0 generating for experiment relay" in (tmp_path / "actor.log").read_text()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["groups"] for r in rows) == steps * BATCH


def test_a_run_rides_out_a_killed_redis_server_then_stops_cleanly_on_ctrl_c(
    warm_model_dir: Path, tmp_path: Path
) -> None:
    # Two faults in one run (one vLLM start): the embedded redis-server is SIGKILLed
    # mid-run, and the supervisor restarts it from its AOF while actors and learner
    # reconnect; later a terminal's Ctrl-C reaches every process of the foreground group,
    # not only the driver: the redis-server among them must outlive the driver's clean stop.
    config = run_config(
        tmp_path, warm_model_dir, "async", steps=10_000,
        eval={"n_prompts": 20, "max_tokens": 6, "before": False},
    )  # fmt: skip
    run_dir = tmp_path / "async"
    metrics = run_dir / "metrics.jsonl"
    out, err = config.with_suffix(".out"), config.with_suffix(".err")
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen([RELAY, "run", "-c", str(config)], env=ENV, stdout=stdout,
                                   stderr=stderr, text=True, start_new_session=True)  # fmt: skip

    def wait_for_steps(steps: int) -> None:
        deadline = time.monotonic() + 600
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
            assert process.poll() is None, err.read_text()[-4000:]
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.1)

    wait_for_steps(2)
    redis_pid = int((run_dir / "redis" / "redis.pid").read_text())
    os.kill(redis_pid, signal.SIGKILL)
    wait_for_steps(5)
    assert int((run_dir / "redis" / "redis.pid").read_text()) != redis_pid  # a new server
    os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=600)
    stderr_text = err.read_text()
    assert process.returncode == 0, stderr_text[-4000:]
    assert "Traceback" not in stderr_text and "PublishError" not in stderr_text
    log_text = (run_dir / "relay.log").read_text() if (run_dir / "relay.log").exists() else ""
    assert "redis-server restarted" in stderr_text + log_text
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    results = json.loads((run_dir / "results.json").read_text())
    steps = len(metrics.read_text().splitlines())
    assert results["steps"] == steps and "accuracy" in results["after"]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step{steps:08d}"
    deadline = time.monotonic() + 30
    while processes_working_in(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_working_in(run_dir) == []
