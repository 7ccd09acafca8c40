"""The rollout contract: what an actor writes and the learner reads.

A `RolloutGroup` is one prompt with `group_size` scored completions. Each completion
keeps, per token, the id, the behaviour log-probability (the sampling policy μ), whether
the token counts in the loss (environment tokens of multi-turn episodes do not), and the
policy version that sampled it, run-length encoded because a weight update in flight
splits one completion between two versions.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np

SCHEMA_VERSION = 1
"""Bumped whenever the encoded layout changes; decoders reject other versions."""

MAX_TOKEN_ID = 2**31 - 1
LOGPROB_TOLERANCE = 1e-4
"""Sampled log-probs may exceed 0 by float rounding; anything larger is corrupt."""

VerifierDetails = dict[str, "str | int | float | bool | None"]


class MalformedRollout(ValueError):
    """A rollout that breaks the contract: wrong lengths, dtypes, ranges or bytes."""


class FinishReason(str, enum.Enum):
    """Why a completion ended."""

    STOP = "stop"
    """The model emitted a stop token or the episode reached its answer."""
    LENGTH = "length"
    """The token budget ran out."""
    TURN_LIMIT = "turn_limit"
    """A multi-turn episode reached the environment's turn limit."""
    ABORT = "abort"
    """Generation was cut short (engine shutdown, error)."""


@dataclass(frozen=True)
class VersionRuns:
    """Policy versions of a token sequence, run-length encoded.

    `versions[i]` repeated `lengths[i]` times; usually a single run.
    """

    versions: np.ndarray
    lengths: np.ndarray

    @classmethod
    def constant(cls, version: int, n_tokens: int) -> VersionRuns:
        """All `n_tokens` sampled by one policy version."""
        if n_tokens == 0:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int32))
        return cls(np.array([version], np.int64), np.array([n_tokens], np.int32))

    @classmethod
    def from_per_token(cls, per_token: np.ndarray | list[int]) -> VersionRuns:
        """Compress a per-token version array."""
        per_token = np.asarray(per_token, dtype=np.int64)
        if per_token.size == 0:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int32))
        change = np.flatnonzero(np.diff(per_token)) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [per_token.size]])
        return cls(per_token[starts], (ends - starts).astype(np.int32))

    def per_token(self) -> np.ndarray:
        """Expand to one version per token."""
        return np.repeat(self.versions, self.lengths)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def min_version(self) -> int:
        return int(self.versions.min())

    @property
    def max_version(self) -> int:
        return int(self.versions.max())

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, VersionRuns)
            and np.array_equal(self.versions, other.versions)
            and np.array_equal(self.lengths, other.lengths)
        )


@dataclass(frozen=True)
class Completion:
    """One sampled completion (or multi-turn episode) and its score."""

    token_ids: np.ndarray
    """int32 [T]: every token after the prompt, sampled or inserted by the environment."""
    behaviour_logprobs: np.ndarray
    """float32 [T]: log μ(token) under the sampling policy; 0 on environment tokens."""
    loss_mask: np.ndarray
    """bool [T]: True on tokens the policy sampled, False on environment tokens."""
    policy_versions: VersionRuns
    """The policy version that sampled each token (covers all T tokens)."""
    reward: float
    finish_reason: FinishReason
    verifier_details: VerifierDetails = field(default_factory=dict)
    """What the verifier found (extracted answer, tests passed, error), for debugging."""
    generation_s: float = 0.0
    """Wall time from the first request to the final token, including environment turns."""

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.size)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Completion)
            and np.array_equal(self.token_ids, other.token_ids)
            and np.array_equal(self.behaviour_logprobs, other.behaviour_logprobs)
            and np.array_equal(self.loss_mask, other.loss_mask)
            and self.policy_versions == other.policy_versions
            and self.reward == other.reward
            and self.finish_reason == other.finish_reason
            and self.verifier_details == other.verifier_details
            and self.generation_s == other.generation_s
        )


@dataclass(frozen=True)
class RolloutGroup:
    """A prompt and its `group_size` completions, the unit the buffer stores and samples."""

    run_id: str
    group_id: str
    env_name: str
    prompt_id: str
    prompt_token_ids: np.ndarray
    """int32 [P]: the prompt as the policy saw it (chat template applied)."""
    completions: list[Completion]
    actor_id: str
    created_at: float
    """Unix time (s) when the group was finished and handed to the buffer."""

    @property
    def min_version(self) -> int:
        """Oldest policy version of any token: what staleness is measured against."""
        return min(c.policy_versions.min_version for c in self.completions)

    @property
    def max_version(self) -> int:
        return max(c.policy_versions.max_version for c in self.completions)

    @property
    def rewards(self) -> np.ndarray:
        return np.array([c.reward for c in self.completions], dtype=np.float64)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RolloutGroup):
            return False
        scalars = ("run_id", "group_id", "env_name", "prompt_id", "actor_id", "created_at")
        return (
            all(getattr(self, name) == getattr(other, name) for name in scalars)
            and np.array_equal(self.prompt_token_ids, other.prompt_token_ids)
            and self.completions == other.completions
        )

    def validate(self) -> None:
        """Raise `MalformedRollout` naming the first field that breaks the contract."""
        for name in ("run_id", "group_id", "env_name", "prompt_id", "actor_id"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise MalformedRollout(f"{name} must be a non-empty string")
        _check_array("prompt_token_ids", self.prompt_token_ids, np.int32)
        if self.prompt_token_ids.size == 0:
            raise MalformedRollout("prompt_token_ids is empty")
        _check_token_range("prompt_token_ids", self.prompt_token_ids)
        if not math.isfinite(self.created_at):
            raise MalformedRollout("created_at is not finite")
        if not self.completions:
            raise MalformedRollout("a group needs at least one completion")
        for i, completion in enumerate(self.completions):
            _validate_completion(f"completions[{i}]", completion)


def _validate_completion(where: str, c: Completion) -> None:
    _check_array(f"{where}.token_ids", c.token_ids, np.int32)
    _check_array(f"{where}.behaviour_logprobs", c.behaviour_logprobs, np.float32)
    _check_array(f"{where}.loss_mask", c.loss_mask, np.bool_)
    n = c.token_ids.size
    if n == 0:
        raise MalformedRollout(f"{where}.token_ids is empty")
    for name in ("behaviour_logprobs", "loss_mask"):
        if getattr(c, name).size != n:
            raise MalformedRollout(
                f"{where}.{name} has {getattr(c, name).size} entries for {n} tokens"
            )
    _check_token_range(f"{where}.token_ids", c.token_ids)
    sampled = c.behaviour_logprobs[c.loss_mask]
    if not np.all(np.isfinite(sampled)):
        raise MalformedRollout(f"{where}.behaviour_logprobs has NaN or inf on sampled tokens")
    if sampled.size and sampled.max() > LOGPROB_TOLERANCE:
        raise MalformedRollout(
            f"{where}.behaviour_logprobs has a positive log-probability ({sampled.max():.3g})"
        )
    runs = c.policy_versions
    _check_array(f"{where}.policy_versions.versions", runs.versions, np.int64)
    _check_array(f"{where}.policy_versions.lengths", runs.lengths, np.int32)
    if runs.versions.size != runs.lengths.size or runs.versions.size == 0:
        raise MalformedRollout(f"{where}.policy_versions has mismatched or empty runs")
    if runs.versions.min() < 0 or runs.lengths.min() <= 0:
        raise MalformedRollout(f"{where}.policy_versions has a negative version or empty run")
    if runs.n_tokens != n:
        raise MalformedRollout(f"{where}.policy_versions covers {runs.n_tokens} tokens, not {n}")
    if not math.isfinite(c.reward):
        raise MalformedRollout(f"{where}.reward is not finite ({c.reward})")
    if not isinstance(c.finish_reason, FinishReason):
        raise MalformedRollout(f"{where}.finish_reason is not a FinishReason")
    if not math.isfinite(c.generation_s) or c.generation_s < 0:
        raise MalformedRollout(f"{where}.generation_s must be a finite non-negative number")


def _check_array(name: str, array: object, dtype: type) -> None:
    if not isinstance(array, np.ndarray) or array.ndim != 1:
        raise MalformedRollout(f"{name} must be a 1-D numpy array")
    if array.dtype != np.dtype(dtype):
        raise MalformedRollout(f"{name} has dtype {array.dtype}, expected {np.dtype(dtype)}")


def _check_token_range(name: str, token_ids: np.ndarray) -> None:
    if token_ids.size and token_ids.min() < 0:
        raise MalformedRollout(f"{name} has a negative token id")
