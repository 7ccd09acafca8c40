"""Small valid rollout groups for tests."""

from __future__ import annotations

import dataclasses

import numpy as np

from buffer.schema import Completion, FinishReason, RolloutGroup, VersionRuns


def make_completion(n: int = 4, version: int = 0, **changes: object) -> Completion:
    completion = Completion(
        token_ids=np.arange(n, dtype=np.int32),
        behaviour_logprobs=np.full(n, -0.5, np.float32),
        loss_mask=np.ones(n, np.bool_),
        policy_versions=VersionRuns.constant(version, n),
        reward=1.0,
        finish_reason=FinishReason.STOP,
    )
    return dataclasses.replace(completion, **changes)


def make_group(*completions: Completion, **changes: object) -> RolloutGroup:
    group = RolloutGroup(
        run_id="run",
        group_id="g1",
        env_name="arithmetic",
        prompt_id="arithmetic:1+1=",
        prompt_token_ids=np.array([2, 35, 82], np.int32),
        completions=list(completions) or [make_completion()],
        actor_id="actor-0",
        created_at=1.7e9,
    )
    return dataclasses.replace(group, **changes)


def versioned_group(
    group_id: str, version: int, group_size: int = 2, tokens: int = 4
) -> RolloutGroup:
    """A group whose every token was sampled by policy `version`; its completions' rewards
    alternate 1, 0, ... (a group with a learning signal, worth replaying)."""
    completions = [
        make_completion(tokens, version, reward=float(i % 2 == 0)) for i in range(group_size)
    ]
    return make_group(*completions, group_id=group_id)
