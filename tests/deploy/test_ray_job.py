"""Cluster launch as documented: a real two-node Ray cluster on this machine (`ray start
--head` plus `ray start --address`), `ray job submit` of `relay run`, and a check that the
job trained on rollouts."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from buffer.server import free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def ray_cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def two_node_cluster(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PATH"] = f"{BIN}:{env['PATH']}"  # the job's `relay` comes from this environment
    # Ray >= 2.59 authenticates local clusters with a token: head, worker and job client
    # share this one (RAY_AUTH_TOKEN), as nodes of a real cluster would.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    port, dashboard = free_port(), free_port()
    worker_tmp = ""
    head = ray_cli(
        "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=true",
        f"--dashboard-port={dashboard}", "--disable-usage-stats", env=env,
    )  # fmt: skip
    assert head.returncode == 0, head.stderr
    try:
        # A temp dir of its own, as a second machine would have: two nodes sharing one would
        # share (and delete) each other's unpacked job working directories.
        worker_tmp = tempfile.mkdtemp(prefix="rayw", dir="/tmp")  # short: socket paths
        worker = ray_cli(
            "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", f"--temp-dir={worker_tmp}",
            env=env,
        )  # fmt: skip
        assert worker.returncode == 0, worker.stderr
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        ray_cli("stop", "--force", env=env)
        shutil.rmtree(worker_tmp, ignore_errors=True)


def test_ray_job_submit_runs_relay_on_a_two_node_cluster(
    two_node_cluster, warm_model_dir: Path, tmp_path: Path
) -> None:
    address, env = two_node_cluster
    work = tmp_path / "job"
    (work / "configs").mkdir(parents=True)
    config = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())
    run_dir = tmp_path / "run"
    config.update(run_dir=str(run_dir), model={"path": str(warm_model_dir)})
    config["actors"].update(num_actors=2, groups_in_flight=4, group_size=4)
    config["learner"].update(steps=4, batch_groups=4)
    config["eval"] = {"n_prompts": 20, "max_tokens": 8, "before": False}
    (work / "configs" / "cluster.yaml").write_text(yaml.safe_dump(config))
    shutil.copy(ROOT / "deploy" / "ray" / "runtime_env.yaml", work / "runtime_env.yaml")

    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(work),
         "--runtime-env", str(work / "runtime_env.yaml"), "--",
         "relay", "run", "-c", "configs/cluster.yaml"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    assert "succeeded" in job.stdout and "held-out accuracy after" in job.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert results["trained_groups"] == 4 * 4
    # Two actors ran, one per node (each node has one CPU and each actor takes one); the
    # one whose engine was ready first may have written every group of so short a run.
    actors = results["actors"]
    assert sorted(actors) == ["actor-0", "actor-1"]
    assert sum(a["groups"] for a in actors.values()) >= 4 * 4
