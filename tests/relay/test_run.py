"""`relay run` end to end on this machine: embedded Redis, local Ray, a vLLM actor, the
DeepSpeed learner, evaluation on vLLM; asynchronous and synchronous schedules.

Runs the command as a user does (a process), then checks what it leaves behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
RELAY = str(Path(sys.executable).parent / "relay")
STEPS, BATCH = 6, 4


def run_config(tmp_path: Path, model: Path, mode: str) -> Path:
    config = tmp_path / f"{mode}.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / mode), "mode": mode, "model": {"path": str(model)},
        "env": {"type": "arithmetic"}, "engine": {"max_model_len": 64},
        "actors": {"group_size": 4, "groups_in_flight": 4, "sampling": {"max_tokens": 6},
                   "metrics_every_s": 0.5},
        "learner": {"steps": STEPS, "batch_groups": BATCH, "checkpoint": {"every_steps": 3},
                    "sample_timeout_s": 120},
        "eval": {"n_prompts": 20, "max_tokens": 6, "before": mode == "async",
                 "every_steps": 3, "in_run_prompts": 10},
        "ray": {"num_cpus": 2},
    }))  # fmt: skip
    return config


def relay_run(config: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(
        [RELAY, "run", "-c", str(config)], env=env, capture_output=True, text=True, timeout=900
    )


def leftover_processes(marker: str) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if marker in line and "ps -eo" not in line]


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_relay_run_trains_on_rollouts_and_cleans_up(
    mode: str, warm_model_dir: Path, tmp_path: Path
) -> None:
    engines_before = len(leftover_processes("EngineCore"))
    done = relay_run(run_config(tmp_path, warm_model_dir, mode))
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = tmp_path / mode
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == STEPS and results["version"] == STEPS
    assert results["trained_groups"] == STEPS * BATCH
    assert 0.0 <= results["after"]["accuracy"] <= 1.0
    assert ("before" in results) == (mode == "async")
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
    assert leftover_processes(str(run_dir)) == []
    assert len(leftover_processes("EngineCore")) == engines_before
