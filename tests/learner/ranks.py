"""A learner rank in a process of its own (spawned by tests/learner/test_ranks.py)."""

from __future__ import annotations

import pickle
from pathlib import Path


def one_step(rank: int, world_size: int, port: int, model: str, groups: Path, out: Path) -> None:
    """Take one learner step on this rank's share of the groups; save the new parameters."""
    import torch

    from learner.config import LearnerConfig
    from learner.trainer import Learner

    everything = pickle.loads(groups.read_bytes())
    share = everything[rank::world_size] if world_size > 1 else everything
    config = LearnerConfig(lr=1e-3, world_size=world_size, micro_batches=2)
    learner = Learner(model, config, rank=rank, world_size=world_size, master_port=port)
    metrics = learner.step(share, learner_version=0)
    if rank == 0:
        state = {k: v.clone() for k, v in learner.state_dict().items()}
        torch.save({"params": state, "metrics": metrics}, out)
    learner.close()
