"""`relay learn` against a real redis-server with real DeepSpeed: stop, crash, resume.

The learner runs as the user runs it, a `relay learn` process, and is stopped with
SIGTERM (clean: it checkpoints) and killed with SIGKILL (a crash: steps since the last
checkpoint are lost and their groups must come back to the buffer).
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from buffer.config import BufferConfig
from buffer.replay_buffer import ReplayBuffer
from tests.learner.synthetic import arithmetic_groups
from weights.redis_store import RedisWeightStore

STEPS, BATCH, GROUPS = 24, 2, 60
RELAY = str(Path(sys.executable).parent / "relay")


def learn_config(
    tmp_path: Path,
    model: Path,
    redis_server,
    prefix: str,
    learner: dict,
    groups: int,
    replay: int = 1,
) -> tuple[Path, ReplayBuffer]:
    """A `relay learn` config for tmp_path/run on the session's Redis under `prefix`, and
    that buffer holding `groups` synthetic groups (no staleness bound, no admission)."""
    from transformers import AutoTokenizer

    buffer_config = {
        "key_prefix": prefix,
        "admission_control": False,
        "max_staleness": 10_000,
        "replay": replay,
    }
    config = tmp_path / "learn.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "model": {"path": str(model)},
        "buffer": {"url": redis_server.url, **buffer_config}, "learner": learner,
    }))  # fmt: skip
    buffer = ReplayBuffer(redis_server.client(), BufferConfig(**buffer_config))
    if groups:
        buffer.put(arithmetic_groups(AutoTokenizer.from_pretrained(model), groups), "synthetic")
    return config, buffer


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def start(config: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.Popen(
        [RELAY, "learn", "-c", str(config), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def wait_for_steps(process: subprocess.Popen, run_dir: Path, steps: int) -> None:
    deadline = time.monotonic() + 180
    while len(metrics(run_dir)) < steps:
        if process.poll() is not None:
            pytest.fail(f"relay learn exited early:\n{process.stdout.read()}")
        assert time.monotonic() < deadline, "relay learn made no progress"
        time.sleep(0.02)


def finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=300)
    return out


@pytest.mark.slow
def test_stop_crash_and_resume_keep_versions_and_lose_no_rollout(
    warm_model_dir: Path, redis_server, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    run_dir, prefix = tmp_path / "run", "test:learn"
    config, buffer = learn_config(tmp_path, warm_model_dir, redis_server, prefix, {
        "steps": STEPS, "batch_groups": BATCH, "lr": 1e-4, "sample_timeout_s": 30,
        "checkpoint": {"every_steps": 4, "keep": 2},
    }, groups=GROUPS)  # fmt: skip
    client = buffer.client

    # 1. A clean stop: SIGTERM mid-run finishes the step and checkpoints it.
    first = start(config)
    wait_for_steps(first, run_dir, 6)
    first.send_signal(signal.SIGTERM)
    out = finish(first)
    assert first.returncode == 0, out
    stopped_at = len(metrics(run_dir))
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step{stopped_at:08d}"

    # A second start without --resume refuses to overwrite the run.
    refused = subprocess.run([RELAY, "learn", "-c", str(config)], capture_output=True, text=True)
    assert refused.returncode == 1 and "--resume" in refused.stderr

    # 2. A crash: SIGKILL a few steps after the next checkpoint.
    second = start(config, "--resume")
    wait_for_steps(second, run_dir, stopped_at + 7)
    second.kill()
    finish(second)
    killed_at = metrics(run_dir)[-1]["step"]

    # 3. Resume to the end.
    third = start(config, "--resume")
    out = finish(third)
    assert third.returncode == 0, out

    rows = metrics(run_dir)
    steps = [r["step"] for r in rows]
    versions = [r["version"] for r in rows]
    # Clean stop: the version sequence goes on exactly as if nothing happened.
    assert steps[:killed_at] == list(range(1, killed_at + 1))
    assert versions[:killed_at] == list(range(1, killed_at + 1))
    # Crash: training restarts after the last checkpoint (every 4 steps) ...
    checkpoint_step = killed_at // 4 * 4
    assert steps[killed_at:] == list(range(checkpoint_step + 1, STEPS + 1))
    # ... and versions published after it were lost: none that an actor could have seen is
    # reused. The killed learner's last publish (version killed_at) was in flight: if it
    # had completed, the resumed run starts above it.
    assert versions[killed_at] in (killed_at + 1, killed_at + 2)
    assert all(b > a for a, b in itertools.pairwise(versions))

    # Every group trained into the final weights was acked exactly once; the rest wait.
    counters = {k.decode(): int(v) for k, v in client.hgetall(buffer.key("counters")).items()}
    assert counters["acked"] == STEPS * BATCH
    assert client.zcard(buffer.key("claimed")) == 0
    assert client.zcard(buffer.key("ready")) == GROUPS - STEPS * BATCH
    assert buffer.held("learner-0") == []
    # The crashed run's uncommitted batches (those trained after the checkpoint, and one
    # it may have just sampled) were given back at once, not after the 300 s visibility
    # timeout: they are the only redeliveries.
    lost = (killed_at - checkpoint_step) * BATCH
    assert counters["redelivered"] in (lost, lost + BATCH)
    # The learner's own ledger, kept apart from the buffer, agrees id by id: every id it
    # acked is acked in Redis, once; an id trained twice is one the crash gave back.
    ledger = [json.loads(line) for line in (run_dir / "ledger-learner-0.jsonl").open()]
    acked = [entry_id for entry in ledger for entry_id in entry.get("acked", [])]
    trained = collections.Counter(i for entry in ledger for i in entry.get("trained", []))
    in_redis = {entry_id.decode() for entry_id in client.zrange(buffer.key("acked"), 0, -1)}
    assert len(acked) == len(set(acked)) == STEPS * BATCH and set(acked) == in_redis
    assert sum(trained.values()) == len(rows) * BATCH
    assert sum(n - 1 for n in trained.values()) <= lost
    assert {i for i, n in trained.items() if n > 1} <= in_redis

    # The exported policy is the last published version, loadable with from_pretrained.
    assert buffer.version() == versions[-1]
    store = RedisWeightStore(client, prefix)
    published = store.fetch(versions[-1])
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    for name, tensor in exported.named_parameters():
        assert (tensor.detach() == published[name]).all(), name


@pytest.mark.slow
def test_replay_across_a_crash_acks_every_committed_use_once(
    warm_model_dir: Path, redis_server, tmp_path: Path
) -> None:
    from buffer.stats import read_stats

    run_dir, prefix, steps, groups = tmp_path / "run", "test:replay", 16, 16
    config, buffer = learn_config(tmp_path, warm_model_dir, redis_server, prefix, {
        "steps": steps, "batch_groups": BATCH, "lr": 1e-4, "sample_timeout_s": 30,
        "checkpoint": {"every_steps": 4, "keep": 2},
    }, groups=groups, replay=2)  # fmt: skip
    # 16 groups of 2 uses for 16 steps of 2: every use is needed, so the run finishes
    # only if the crash lost none (it would stop on sample_timeout_s otherwise).
    crashed = start(config)
    wait_for_steps(crashed, run_dir, 7)
    crashed.kill()
    finish(crashed)
    killed_at = metrics(run_dir)[-1]["step"]
    resumed = start(config, "--resume")
    out = finish(resumed)
    assert resumed.returncode == 0, out

    rows = metrics(run_dir)
    assert rows[-1]["step"] == steps
    assert any(r["learner/replayed_fraction"] > 0 for r in rows)
    stats = read_stats(buffer)
    # Every use in the final weights was acked once: 16 committed steps of 2 uses.
    assert stats.counters["acked"] == steps * BATCH
    assert set(stats.sampled_uses_histogram) <= {1, 2}  # no group handed out a third time
    # The crash's uncommitted uses were handed out again: more deliveries than acks.
    lost = (killed_at - killed_at // 4 * 4) * BATCH
    assert sum(stats.sampled_uses_histogram.values()) >= steps * BATCH + lost
    assert stats.claimed == 0 and buffer.held("learner-0") == []


@pytest.mark.slow
def test_time_limit_stops_after_a_checkpoint_and_snapshots_list_their_times(
    warm_model_dir: Path, redis_server, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    run_dir, prefix = tmp_path / "run", "test:time-limit"
    config, _ = learn_config(tmp_path, warm_model_dir, redis_server, prefix, {
        "steps": 10_000, "batch_groups": 1, "lr": 1e-4, "time_limit_s": 2.0,
        "snapshot_every_steps": 3, "checkpoint": {"every_steps": 0},
    }, groups=2_000)  # fmt: skip
    started = time.time()
    process = start(config)
    out = finish(process)
    assert process.returncode == 0, out

    rows = metrics(run_dir)
    steps = len(rows)
    assert 3 <= steps < 10_000  # stopped by the limit, not by running out of steps
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step{steps:08d}"
    trained = rows[-1]["time"] - rows[0]["time"]
    assert trained < 2.0 + 5.0  # the limit, plus at most the step and snapshot under way

    snapshots = [
        json.loads(line)
        for line in (run_dir / "snapshots" / "snapshots.jsonl").read_text().splitlines()
    ]
    # The starting policy, every third step, and the final one.
    assert [s["step"] for s in snapshots] == sorted({*range(0, steps + 1, 3), steps})
    assert [s["version"] for s in snapshots] == [s["step"] for s in snapshots]
    times = [s["time"] for s in snapshots]
    assert started < times[0] < rows[0]["time"] and times == sorted(times)
    # Each is a loadable policy, and each differs from the one before (training went on).
    first, second = (AutoModelForCausalLM.from_pretrained(s["path"]) for s in snapshots[:2])
    assert any(
        not (a == b).all() for a, b in zip(first.parameters(), second.parameters(), strict=True)
    )


@pytest.mark.slow
def test_a_batch_with_a_non_finite_loss_is_skipped_quarantined_and_never_published(
    warm_model_dir: Path, redis_server, tmp_path: Path
) -> None:
    import dataclasses

    from transformers import AutoTokenizer

    run_dir, prefix = tmp_path / "run", "test:poison"
    steps = 4
    config, buffer = learn_config(tmp_path, warm_model_dir, redis_server, prefix, {
        "steps": steps, "batch_groups": 1, "lr": 1e-4, "checkpoint": {"every_steps": 2},
        "advantage": "grpo_no_std",
    }, groups=0)  # fmt: skip
    # Finite, so `put` takes it, but its advantage (r - mean r, unnormalised) is past
    # float32's range: the loss is not finite.
    tokenizer = AutoTokenizer.from_pretrained(warm_model_dir)
    clean = arithmetic_groups(tokenizer, steps, seed=5)
    head = clean[0]
    huge = [dataclasses.replace(c, reward=1e300 * (i % 2)) for i, c in enumerate(head.completions)]
    # Sampled first: groups of one version go out in id order.
    poison = dataclasses.replace(head, group_id="0-poison", completions=huge)
    buffer.put([poison], "poisoner")
    buffer.put(clean, "synthetic")
    process = start(config)
    out = finish(process)
    assert process.returncode == 0, out

    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # the skip is not a step
    assert [r["version"] for r in rows] == list(range(1, steps + 1))
    assert rows[-1]["learner/skipped_batches"] == 1
    (record,) = buffer.quarantined()
    assert "non-finite loss" in record.reason and record.entry_id
    assert int(buffer.client.hget(buffer.key("counters"), "acked")) == steps
    weights = RedisWeightStore(buffer.client, prefix).fetch(buffer.version())
    assert all(bool(tensor.isfinite().all()) for tensor in weights.values())
    assert "skipped a batch" in out
