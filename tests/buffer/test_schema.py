"""The rollout contract's own checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from buffer.schema import MalformedRollout, VersionRuns
from tests.buffer.factories import make_completion, make_group


def test_version_runs_compress_and_expand() -> None:
    # [5, 5, 5, 6, 6] -> versions [5, 6] with lengths [3, 2]
    runs = VersionRuns.from_per_token([5, 5, 5, 6, 6])
    assert runs.versions.tolist() == [5, 6]
    assert runs.lengths.tolist() == [3, 2]
    assert runs.per_token().tolist() == [5, 5, 5, 6, 6]
    assert (runs.min_version, runs.max_version, runs.n_tokens) == (5, 6, 5)


def test_group_versions_span_all_completions() -> None:
    late = make_completion(version=7)
    split = make_completion(policy_versions=VersionRuns.from_per_token([4, 4, 5, 5]))
    group = make_group(late, split)
    assert (group.min_version, group.max_version) == (4, 7)
    group.validate()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"behaviour_logprobs": np.full(3, -0.5, np.float32)}, "behaviour_logprobs has 3 entries"),
        ({"loss_mask": np.ones(5, np.bool_)}, "loss_mask has 5 entries"),
        ({"token_ids": np.arange(4, dtype=np.int64)}, "dtype int64"),
        ({"token_ids": np.array([0, -1, 2, 3], np.int32)}, "negative token id"),
        ({"behaviour_logprobs": np.array([-1, np.nan, -1, -1], np.float32)}, "NaN"),
        (
            {"behaviour_logprobs": np.array([-1, 0.5, -1, -1], np.float32)},
            "positive log-probability",
        ),
        ({"policy_versions": VersionRuns.constant(1, 3)}, "covers 3 tokens, not 4"),
        ({"policy_versions": VersionRuns.constant(-1, 4)}, "negative version"),
        ({"reward": float("nan")}, "reward is not finite"),
        ({"generation_s": -1.0}, "generation_s"),
    ],
)
def test_validate_names_the_broken_field(changes: dict, message: str) -> None:
    with pytest.raises(MalformedRollout, match=message):
        make_group(make_completion(**changes)).validate()


def test_environment_tokens_may_carry_any_finite_logprob() -> None:
    # Masked (environment) tokens are not sampled: any finite placeholder will do ...
    logprobs = np.array([-1.0, -30.0, 5.0, -1.0], np.float32)
    mask = np.array([True, False, False, True])
    make_group(make_completion(behaviour_logprobs=logprobs, loss_mask=mask)).validate()
    # ... but not NaN or inf, which poison any arithmetic over the column.
    for poison in (np.nan, np.inf, -np.inf):
        logprobs[1] = poison
        with pytest.raises(MalformedRollout, match="behaviour_logprobs has NaN or inf"):
            make_group(make_completion(behaviour_logprobs=logprobs, loss_mask=mask)).validate()


def test_group_needs_completions_and_ids() -> None:
    with pytest.raises(MalformedRollout, match="at least one completion"):
        dataclasses.replace(make_group(), completions=[]).validate()
    with pytest.raises(MalformedRollout, match="group_id"):
        dataclasses.replace(make_group(), group_id="").validate()


def test_errors_name_the_completion_that_is_wrong() -> None:
    # Columns are checked for the whole group at once; the message still points at
    # the second completion, whose third token is negative.
    bad = make_completion(token_ids=np.array([0, 1, -2, 3], np.int32))
    with pytest.raises(MalformedRollout, match=r"completions\[1\]\.token_ids has a negative"):
        make_group(make_completion(), bad, make_completion()).validate()
    runs = VersionRuns(np.array([1, -1]), np.array([2, 2], np.int32))
    with pytest.raises(MalformedRollout, match=r"completions\[2\]\.policy_versions has a negative"):
        make_group(
            make_completion(), make_completion(), make_completion(policy_versions=runs)
        ).validate()
