"""Experiment trackers beside metrics.jsonl and Prometheus: Weights & Biases and TensorBoard.

Rank 0's learner record of every step goes to each tracker the config turns on, under the
dashboard's names (`learner/loss`, `eval/greedy_accuracy`, ...; a key the dashboard does
not name becomes `learner/<key>`), at the learner's step. W&B runs offline by default,
which needs no network or account (`wandb sync` uploads the run later); a resumed run
continues the same W&B run, whose id is kept in run_dir.
"""

from __future__ import annotations

import logging
import math
import secrets
from pathlib import Path
from typing import Any

from relay.config import RunConfig, dump_config
from relay.dashboard.snapshot import LEARNER_FIELDS
from relay.errors import RelayError

log = logging.getLogger(__name__)
WANDB_ID_FILE = "wandb-run-id"
SKIPPED = frozenset({"step", "version", "time"})
"""Record keys that are the axis or bookkeeping, not a metric."""


def tracked(metrics: dict[str, Any]) -> dict[str, float]:
    """The record's numeric metrics under their tracker names."""
    out = {}
    for key, value in metrics.items():
        if key in SKIPPED or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[LEARNER_FIELDS.get(key, key if "/" in key else f"learner/{key}")] = float(value)
    return out


class Trackers:
    """The trackers `logging` turns on, fed one learner record per step."""

    def __init__(self, config: RunConfig, resume: bool) -> None:
        self._wandb = None
        self._tensorboard = None
        settings = config.logging
        if settings.tensorboard:
            self._tensorboard = _summary_writer(config.run_dir / "tensorboard")
        if settings.wandb is not None:
            self._wandb = _wandb_run(config, resume)

    def log(self, metrics: dict[str, Any]) -> None:
        values, step = tracked(metrics), int(metrics.get("step", 0))
        if not values:
            return
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(name, value, global_step=step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def _summary_writer(directory: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise RelayError(
            "logging.tensorboard needs the tensorboard package: pip install 'relay-rl[trackers]'"
        ) from error
    return SummaryWriter(log_dir=str(directory))


def _wandb_run(config: RunConfig, resume: bool) -> Any:
    try:
        import wandb
    except ImportError as error:
        raise RelayError(
            "logging.wandb needs the wandb package: pip install 'relay-rl[trackers]'"
        ) from error
    import yaml

    settings = config.logging.wandb
    id_file = config.run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else secrets.token_hex(4)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id + "\n")
    run = wandb.init(
        project=settings.project, entity=settings.entity, name=settings.name or config.run_dir.name,
        tags=settings.tags, mode=settings.mode, dir=str(config.run_dir), id=run_id,
        resume="allow", config=yaml.safe_load(dump_config(config)),
        settings=wandb.Settings(silent=True, console="off"),
    )  # fmt: skip
    log.info("W&B run %s (%s) in %s", run_id, settings.mode, config.run_dir / "wandb")
    return run
