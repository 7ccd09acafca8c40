"""W&B (offline) and TensorBoard receive the learner's metrics; the files they write are
read back and compared with metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relay.config import RunConfig
from relay.trackers import WANDB_ID_FILE, Trackers, tracked
from tests.learner.test_loop import finish, learn_config, metrics, start

WANDB_BLOCK = 32 * 1024
"""W&B's transaction log is LevelDB's log format: 32 KiB blocks of framed records."""


def wandb_history(run_dir: Path) -> dict[int, dict[str, float]]:
    """Every history row of the offline W&B runs under run_dir, by step, read from their
    .wandb files (7-byte file header, then records framed as crc32, u16 length, u8 type)."""
    from wandb.proto.wandb_internal_pb2 import Record

    rows: dict[int, dict[str, float]] = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, position, pending = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while position + 7 <= len(data):
            left = WANDB_BLOCK - position % WANDB_BLOCK
            length, kind = (
                int.from_bytes(data[position + 4 : position + 6], "little"),
                data[position + 6],
            )
            if left < 7 or (length == 0 and kind == 0):  # a block's padding
                position += left
                continue
            pending += data[position + 7 : position + 7 + length]
            position += 7 + length
            if kind in (1, 4):  # a full record, or the last part of one
                record = Record.FromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "history":
                    items = {
                        i.key or "/".join(i.nested_key): i.value_json for i in record.history.item
                    }
                    step = int(json.loads(items.pop("_step")))
                    rows.setdefault(step, {}).update(
                        {k: json.loads(v) for k, v in items.items() if not k.startswith("_")}
                    )
    return rows


def tensorboard_scalars(directory: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tracked_names_follow_the_dashboard() -> None:
    record = {"step": 3, "version": 3, "time": 1.0, "loss": 0.5, "accuracy": 0.25,
              "is_ess": 0.9, "eval/pass_at_1": 0.3, "done": True, "note": "x",
              "reward_mean": float("nan")}  # fmt: skip
    assert tracked(record) == {
        "learner/loss": 0.5, "eval/greedy_accuracy": 0.25, "learner/is_ess": 0.9,
        "eval/pass_at_1": 0.3,
    }  # fmt: skip


def test_a_resumed_run_continues_its_wandb_run(tmp_path: Path) -> None:
    config = RunConfig.model_validate(
        {"run_dir": str(tmp_path), "logging": {"wandb": {"project": "t"}, "tensorboard": True}}
    )
    first = Trackers(config, resume=False)
    first.log({"step": 1, "loss": 1.0})
    first.close()
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    second = Trackers(config, resume=True)
    second.log({"step": 2, "loss": 0.5})
    second.close()
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == run_id
    assert {p.name for p in tmp_path.glob("wandb/offline-run-*/run-*.wandb")} == {
        f"run-{run_id}.wandb"
    }
    assert wandb_history(tmp_path) == {1: {"learner/loss": 1.0}, 2: {"learner/loss": 0.5}}
    assert tensorboard_scalars(tmp_path / "tensorboard") == {"learner/loss": {1: 1.0, 2: 0.5}}
    fresh = Trackers(config, resume=False)  # a new run (not resumed) is a new W&B run
    fresh.close()
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() != run_id


@pytest.mark.slow
def test_relay_learn_writes_every_step_to_both_trackers(
    warm_model_dir: Path, redis_server, tmp_path: Path
) -> None:
    config, _ = learn_config(tmp_path, warm_model_dir, redis_server, "test:trackers", {
        "steps": 4, "batch_groups": 2, "lr": 1e-4, "checkpoint": {"every_steps": 0},
    }, groups=8)  # fmt: skip
    process = start(config, "logging.tensorboard=true", "logging.wandb.mode=offline")
    out = finish(process)
    assert process.returncode == 0, out
    run_dir = tmp_path / "run"
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    history = wandb_history(run_dir)
    assert sorted(history) == [1, 2, 3, 4]
    for row in rows:
        expected = tracked(row)
        assert {"learner/loss", "learner/reward_mean", "learner/tokens"} <= set(expected)
        assert history[row["step"]] == pytest.approx(expected)
        for name, value in expected.items():
            assert scalars[name][row["step"]] == pytest.approx(value, rel=1e-6)
