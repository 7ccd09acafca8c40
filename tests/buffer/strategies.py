"""Hypothesis strategies for valid rollout groups."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from buffer.schema import Completion, FinishReason, RolloutGroup, VersionRuns

names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), names
)


@st.composite
def completions(draw: st.DrawFn) -> Completion:
    n = draw(st.integers(1, 40))
    token_ids = np.array(
        draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n)), np.int32
    )
    loss_mask = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), np.bool_)
    logprobs = np.array(
        draw(st.lists(st.floats(-30, 0, width=32), min_size=n, max_size=n)), np.float32
    )
    logprobs[~loss_mask] = 0.0
    # Versions never decrease within a completion: weights only move forward.
    steps = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    start = draw(st.integers(0, 10_000))
    per_token = start + np.cumsum(steps) - steps[0]
    return Completion(
        token_ids=token_ids,
        behaviour_logprobs=logprobs,
        loss_mask=loss_mask,
        policy_versions=VersionRuns.from_per_token(per_token),
        reward=draw(st.floats(-10, 10)),
        finish_reason=draw(st.sampled_from(FinishReason)),
        verifier_details=draw(st.dictionaries(names, scalars, max_size=3)),
        generation_s=draw(st.floats(0, 1e4)),
    )


@st.composite
def rollout_groups(draw: st.DrawFn) -> RolloutGroup:
    p = draw(st.integers(1, 30))
    return RolloutGroup(
        run_id=draw(names),
        group_id=draw(names),
        env_name=draw(names),
        prompt_id=draw(names),
        prompt_token_ids=np.array(
            draw(st.lists(st.integers(0, 500), min_size=p, max_size=p)), np.int32
        ),
        completions=draw(st.lists(completions(), min_size=1, max_size=6)),
        actor_id=draw(names),
        created_at=draw(st.floats(0, 2e9)),
    )
