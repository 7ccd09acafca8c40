"""The fault benchmark's counters can fail: each is non-zero when what it counts happens.

A run directory is built by hand (a real redis-server on its data directory, a learner
ledger written as the learner writes it); `benchmarks/faults.py` reads it back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from buffer.config import BufferConfig, RedisServerConfig
from buffer.replay_buffer import ReplayBuffer
from buffer.server import RedisServer
from tests.buffer.factories import versioned_group

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import faults


def run_dir_with(tmp_path: Path, ledger: list[dict], ack: int, forget: int = 0) -> Path:
    """A run's Redis holding 6 groups put, `ack` of them acked, `forget` of the rest gone
    without a trace; and the learner's ledger."""
    run_dir = tmp_path / "run"
    with RedisServer(run_dir / "redis", RedisServerConfig()) as server:
        buffer = ReplayBuffer(server.client(), BufferConfig(key_prefix="relay"))
        buffer.put([versioned_group(f"g{i}", 0) for i in range(6)], "actor-0")
        if ack:
            buffer.ack(buffer.sample(ack))
        for i in range(6 - forget, 6):  # a loss no counter knows of
            buffer.client.zrem(buffer.key("live"), f"g{i}")
            buffer.client.zrem(buffer.key("ready"), f"g{i}")
    (run_dir / "ledger-learner-0.jsonl").write_text(
        "".join(json.dumps(entry) + "\n" for entry in ledger)
    )
    return run_dir


def test_a_clean_run_counts_nothing(tmp_path: Path) -> None:
    ledger = [{"step": 1, "version": 0, "trained": ["g0", "g1"]}, {"acked": ["g0", "g1"]}]
    run = faults.account(run_dir_with(tmp_path, ledger, ack=2))
    assert (run["acked_lost"], run["trained_twice"]) == (0, 0)
    assert faults.unaccounted(run) == 0


def test_retraining_and_lost_acks_are_counted_by_id(tmp_path: Path) -> None:
    # g0 trained twice (a driver kill before its checkpoint); the ledger says g1 and g5
    # were acked, but Redis holds g0 and g1 as acked: g5's ack was lost.
    ledger = [
        {"step": 1, "version": 0, "trained": ["g0", "g1"]},
        {"step": 1, "version": 0, "trained": ["g0", "g5"]},
        {"acked": ["g0", "g1", "g5"]},
    ]
    run = faults.account(run_dir_with(tmp_path, ledger, ack=2))
    assert run["trained_twice"] == 1 and run["acked_lost"] == 1


def test_a_group_gone_without_a_trace_is_unaccounted(tmp_path: Path) -> None:
    run = faults.account(run_dir_with(tmp_path, [{"acked": []}], ack=0, forget=2))
    assert faults.unaccounted(run) == 2


def test_no_ledger_is_an_error_not_zero(tmp_path: Path) -> None:
    run_dir = run_dir_with(tmp_path, [], ack=0)
    (run_dir / "ledger-learner-0.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="no learner ledger"):
        faults.account(run_dir)


def test_recovery_counts_from_the_injection_and_a_pause_whole() -> None:
    steps = [{"time": 100.1}, {"time": 160.4}]  # a step finished as Redis was paused
    assert faults.recovery_s(steps, injected=100.0, ended=160.0) == pytest.approx(60.4)
    assert faults.recovery_s(steps, injected=100.0, ended=100.0) == pytest.approx(0.1)
    assert faults.recovery_s(steps, injected=100.0, ended=170.0) is None
