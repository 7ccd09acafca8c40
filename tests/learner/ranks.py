"""A learner rank in a process of its own (spawned by tests/learner/test_ranks.py)."""

from __future__ import annotations

import pickle
from pathlib import Path


def one_step(
    rank: int, world_size: int, port: int, model: str, groups: Path, out: Path, config: dict
) -> None:
    """Take one learner step on this rank's share of the groups; save the new parameters.

    Rank r of n takes groups r, r + n, ...; one rank takes them all, in the file's order.
    """
    import torch

    from learner.config import LearnerConfig
    from learner.trainer import Learner

    everything = pickle.loads(groups.read_bytes())
    share = everything[rank::world_size]
    learner_config = LearnerConfig.model_validate({**config, "world_size": world_size})
    learner = Learner(model, learner_config, rank=rank, world_size=world_size, master_port=port)
    metrics = learner.step(share, learner_version=0)
    if rank == 0:
        state = {k: v.clone() for k, v in learner.state_dict().items()}
        torch.save({"params": state, "metrics": metrics}, out)
    learner.close()
