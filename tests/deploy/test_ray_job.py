"""Cluster launch as documented: a real two-node Ray cluster on this machine (`ray start
--head` plus `ray start --address`), `ray job submit` of `relay run`, and a check that the
job trained on rollouts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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
    port, dashboard = free_port(), free_port()
    head = ray_cli(
        "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=true",
        f"--dashboard-port={dashboard}", "--disable-usage-stats", env=env,
    )  # fmt: skip
    assert head.returncode == 0, head.stderr
    try:
        worker = ray_cli("start", f"--address=127.0.0.1:{port}", "--num-cpus=1", env=env)
        assert worker.returncode == 0, worker.stderr
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        ray_cli("stop", "--force", env=env)


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
    # Both actors generated (one per node: each node has one CPU, each actor takes one).
    assert all(results["actors"][f"actor-{i}"]["groups"] > 0 for i in range(2))
