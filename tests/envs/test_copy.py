"""The `copy` task: heavy-tailed lengths, disjoint splits, an exact verifier."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from envs.base import Message, Split
from envs.copy_digits import CopyConfig, CopyEnv, string_split


def test_lengths_are_heavy_tailed_alike_in_both_splits_which_are_disjoint() -> None:
    env = CopyEnv(CopyConfig())
    train = env.prompts(Split.TRAIN, 5000, seed=0)
    test = env.prompts(Split.TEST, 2000, seed=0)
    for prompts in (train, test):
        # Reply tokens: the digits and the end of turn. P(L) ∝ L^-1.7 on 3..64: the 99th
        # percentile is over eight times the median, in both splits.
        replies = np.array([len(p.reference) + 1 for p in prompts])
        assert np.percentile(replies, 99) >= 8 * np.percentile(replies, 50)
        assert np.percentile(replies, 50) == 7
        assert replies.min() >= 4 and replies.max() <= 65
    assert not {p.reference for p in test} & {p.reference for p in train}
    assert all(string_split(p.reference, 10) is Split.TEST for p in test)
    assert env.prompts(Split.TEST, 2000, seed=0) == test  # deterministic in the seed
    assert test[0].messages[0].content == f"copy {test[0].reference}"


def test_only_the_exact_string_is_right() -> None:
    env = CopyEnv(CopyConfig())
    prompt = env.prompts(Split.TRAIN, 1, seed=3)[0]
    assert env.verify(prompt, [Message("assistant", f" {prompt.reference}\n")]).correct
    assert not env.verify(prompt, [Message("assistant", prompt.reference + "0")]).correct
    assert not env.verify(prompt, [Message("assistant", "")]).correct
    assert env.demonstration(prompt) == prompt.reference


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="min_length=9 exceeds max_length=4"):
        CopyConfig(min_length=9, max_length=4)
    with pytest.raises(ValidationError, match=r"must contain \{digits\}"):
        CopyConfig(question="copy this")
