"""The rollout contract: what an actor writes and the learner reads.

A `RolloutGroup` is one prompt with `group_size` scored completions. Each completion
keeps, per token, the id, the behaviour log-probability (the sampling policy μ), whether
the token counts in the loss (environment tokens of multi-turn episodes do not), and the
policy version that sampled it, run-length encoded because a weight update in flight
splits one completion between two versions.
"""

from __future__ import annotations

import enum
import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

SCHEMA_VERSION = 3
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
    completions: Sequence[Completion]
    """A list when built by an actor; a `ColumnCompletions` when decoded from the buffer."""
    actor_id: str
    created_at: float
    """Unix time (s) when the group was finished and handed to the buffer."""

    @property
    def min_version(self) -> int:
        """Oldest policy version of any token: what staleness is measured against."""
        if isinstance(self.completions, ColumnCompletions):
            return int(self.completions.columns.version_values.min())
        return min(c.policy_versions.min_version for c in self.completions)

    @property
    def max_version(self) -> int:
        if isinstance(self.completions, ColumnCompletions):
            return int(self.completions.columns.version_values.max())
        return max(c.policy_versions.max_version for c in self.completions)

    @property
    def rewards(self) -> np.ndarray:
        if isinstance(self.completions, ColumnCompletions):
            return self.completions.columns.rewards
        return np.array([c.reward for c in self.completions], dtype=np.float64)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RolloutGroup):
            return False
        scalars = ("run_id", "group_id", "env_name", "prompt_id", "actor_id", "created_at")
        return (
            all(getattr(self, name) == getattr(other, name) for name in scalars)
            and np.array_equal(self.prompt_token_ids, other.prompt_token_ids)
            and list(self.completions) == list(other.completions)
        )

    def validate(self) -> None:
        """Raise `MalformedRollout` naming the first field that breaks the contract."""
        self.columns().validate()

    def validate_header(self) -> None:
        """Check the group's ids and timestamp (the completions are checked as columns)."""
        for name in ("run_id", "group_id", "env_name", "prompt_id", "actor_id"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise MalformedRollout(f"{name} must be a non-empty string")
        if not math.isfinite(self.created_at):
            raise MalformedRollout("created_at is not finite")

    def columns(self) -> GroupColumns:
        """The completions' arrays concatenated: the layout that is encoded and validated.

        Checks every array's type, dtype and length on the way; the values are checked by
        `GroupColumns.validate` (or `check_columns` for many groups at once).
        """
        if isinstance(self.completions, ColumnCompletions):
            self.validate_header()
            return self.completions.columns
        return gather_columns([self]).group(0)


def gather_columns(groups: Sequence[RolloutGroup]) -> BatchColumns:
    """Every group's completions as columns, concatenated once for all the groups.

    One concatenation per column for the batch, not one per group and another to check
    them together, is what encoding costs most. Checks every array's type, dtype and
    length on the way; the values are checked by `BatchColumns.errors`.
    """
    for group in groups:
        group.validate_header()
        if not group.completions:
            raise MalformedRollout("a group needs at least one completion")
        _check_array("prompt_token_ids", group.prompt_token_ids, np.int32)
    if any(isinstance(group.completions, ColumnCompletions) for group in groups):
        return BatchColumns.of([group.columns() for group in groups])
    cs = [c for group in groups for c in group.completions]
    arrays = {
        "token_ids": [c.token_ids for c in cs],
        "behaviour_logprobs": [c.behaviour_logprobs for c in cs],
        "loss_mask": [c.loss_mask for c in cs],
        "policy_versions.versions": [c.policy_versions.versions for c in cs],
        "policy_versions.lengths": [c.policy_versions.lengths for c in cs],
    }
    if not _arrays_well_formed(arrays, cs):
        for group in groups:
            _check_completions(group.completions)
    token_counts = [a.size for a in arrays["token_ids"]]
    run_counts = [a.size for a in arrays["policy_versions.versions"]]
    per_completion = list(itertools.accumulate((len(g.completions) for g in groups), initial=0))
    per_token = [sum(token_counts[a:b]) for a, b in itertools.pairwise(per_completion)]
    per_run = [sum(run_counts[a:b]) for a, b in itertools.pairwise(per_completion)]
    prompt_bounds = list(itertools.accumulate((g.prompt_token_ids.size for g in groups), initial=0))
    token_bounds = list(itertools.accumulate(per_token, initial=0))
    run_bounds = list(itertools.accumulate(per_run, initial=0))
    reasons = [c.finish_reason for c in cs]
    details = [c.verifier_details for c in cs]
    return BatchColumns(
        arrays=[
            np.concatenate([group.prompt_token_ids for group in groups]),
            np.array(token_counts, np.int32),
            np.concatenate(arrays["token_ids"]),
            np.concatenate(arrays["behaviour_logprobs"]),
            np.concatenate(arrays["loss_mask"]),
            np.concatenate(arrays["policy_versions.versions"]),
            np.concatenate(arrays["policy_versions.lengths"]),
            np.array(run_counts, np.int32),
            np.array([c.reward for c in cs], np.float64),
            np.array([c.generation_s for c in cs], np.float64),
        ],
        bounds=[
            prompt_bounds,
            per_completion,
            token_bounds,
            token_bounds,
            token_bounds,
            run_bounds,
            run_bounds,
            per_completion,
            per_completion,
            per_completion,
        ],
        finish_reasons=[reasons[a:b] for a, b in itertools.pairwise(per_completion)],
        verifier_details=[details[a:b] for a, b in itertools.pairwise(per_completion)],
    )


_ARRAY_DTYPES = {
    "token_ids": np.dtype(np.int32),
    "behaviour_logprobs": np.dtype(np.float32),
    "loss_mask": np.dtype(np.bool_),
    "policy_versions.versions": np.dtype(np.int64),
    "policy_versions.lengths": np.dtype(np.int32),
}


def _arrays_well_formed(arrays: dict[str, list], completions: Sequence[Completion]) -> bool:
    """One pass over every completion's arrays: 1-D numpy of the contract's dtype, and
    per-token arrays as long as the tokens. False sends the caller to the slow path that
    names the offending completion (and accepts what is merely unusual, like a subclass)."""
    try:
        for name, dtype in _ARRAY_DTYPES.items():
            if {(type(a), a.ndim, a.dtype) for a in arrays[name]} != {(np.ndarray, 1, dtype)}:
                return False
    except AttributeError:
        return False
    sizes = [a.size for a in arrays["token_ids"]]
    return (
        [a.size for a in arrays["behaviour_logprobs"]] == sizes
        and [a.size for a in arrays["loss_mask"]] == sizes
        and {type(c.finish_reason) for c in completions} == {FinishReason}
    )


def _check_completions(completions: Sequence[Completion]) -> None:
    """Raise `MalformedRollout` for the first completion whose arrays break the contract."""
    for i, c in enumerate(completions):
        where = f"completions[{i}]"
        for name, dtype in _COMPLETION_DTYPES.items():
            _check_array(f"{where}.{name}", getattr(c, name), dtype)
        _check_array(f"{where}.policy_versions.versions", c.policy_versions.versions, np.int64)
        _check_array(f"{where}.policy_versions.lengths", c.policy_versions.lengths, np.int32)
        for name in ("behaviour_logprobs", "loss_mask"):
            if getattr(c, name).size != c.token_ids.size:
                raise MalformedRollout(
                    f"{where}.{name} has {getattr(c, name).size} entries "
                    f"for {c.token_ids.size} tokens"
                )
        if not isinstance(c.finish_reason, FinishReason):
            raise MalformedRollout(f"{where}.finish_reason is not a FinishReason")


_COMPLETION_DTYPES = {
    "token_ids": np.int32,
    "behaviour_logprobs": np.float32,
    "loss_mask": np.bool_,
}


@dataclass(frozen=True)
class GroupColumns:
    """A group's completions as concatenated arrays (one entry per token, run or completion).

    Checking a group column by column costs a few numpy calls whatever the group size,
    instead of a few per completion; failures are traced back to the completion.
    """

    prompt_token_ids: np.ndarray
    completion_lengths: np.ndarray
    token_ids: np.ndarray
    behaviour_logprobs: np.ndarray
    loss_mask: np.ndarray
    version_values: np.ndarray
    version_lengths: np.ndarray
    runs_per_completion: np.ndarray
    rewards: np.ndarray
    generation_s: np.ndarray
    finish_reasons: list[FinishReason]
    verifier_details: list[VerifierDetails]

    def validate(self) -> None:
        """Raise `MalformedRollout` naming the first completion and field that is wrong."""
        if self.prompt_token_ids.size == 0:
            raise MalformedRollout("prompt_token_ids is empty")
        if self.prompt_token_ids.min() < 0:
            raise MalformedRollout("prompt_token_ids has a negative token id")
        lengths = self.completion_lengths
        n_completions = lengths.size
        if n_completions == 0:
            raise MalformedRollout("a group needs at least one completion")
        for name in ("runs_per_completion", "rewards", "generation_s"):
            if getattr(self, name).size != n_completions:
                raise MalformedRollout(
                    f"{name} has {getattr(self, name).size} entries for {n_completions} completions"
                )
        if len(self.finish_reasons) != n_completions or len(self.verifier_details) != n_completions:
            raise MalformedRollout(
                "finish_reasons or verifier_details do not match the completions"
            )
        if lengths.min() <= 0:
            raise MalformedRollout(f"completions[{int(np.argmin(lengths))}].token_ids is empty")
        total = int(lengths.sum())
        for name in ("token_ids", "behaviour_logprobs", "loss_mask"):
            if getattr(self, name).size != total:
                raise MalformedRollout(
                    f"{name} holds {getattr(self, name).size} entries for {total} tokens"
                )
        if self.token_ids.min() < 0:
            self._fail(lengths, self.token_ids < 0, "token_ids has a negative token id")
        if self.loss_mask.view(np.uint8).max() > 1:
            self._fail(
                lengths,
                self.loss_mask.view(np.uint8) > 1,
                "loss_mask holds a value other than 0 or 1",
            )
        # Environment tokens are not sampled (their log-prob is a placeholder), but a NaN
        # there is still poison for any arithmetic that touches the whole column.
        bad = ~np.isfinite(self.behaviour_logprobs)
        if bad.any():
            self._fail(lengths, bad, "behaviour_logprobs has NaN or inf")
        sampled = self.behaviour_logprobs[self.loss_mask]
        if sampled.size and sampled.max() > LOGPROB_TOLERANCE:
            bad = self.loss_mask & (self.behaviour_logprobs > LOGPROB_TOLERANCE)
            self._fail(
                lengths,
                bad,
                f"behaviour_logprobs has a positive log-probability ({sampled.max():.3g})",
            )
        runs = self.runs_per_completion
        n_runs = int(runs.sum())
        if (
            runs.min() <= 0
            or self.version_values.size != n_runs
            or self.version_lengths.size != n_runs
        ):
            i = int(np.argmin(runs)) if runs.min() <= 0 else 0
            raise MalformedRollout(f"completions[{i}].policy_versions has mismatched or empty runs")
        if self.version_values.min() < 0 or self.version_lengths.min() <= 0:
            bad = (self.version_values < 0) | (self.version_lengths <= 0)
            self._fail(runs, bad, "policy_versions has a negative version or empty run")
        run_starts = np.cumsum(runs) - runs
        covered = np.add.reduceat(self.version_lengths.astype(np.int64), run_starts)
        if not np.array_equal(covered, lengths):
            i = int(np.flatnonzero(covered != lengths)[0])
            raise MalformedRollout(
                f"completions[{i}].policy_versions covers {covered[i]} tokens, not {lengths[i]}"
            )
        if not np.isfinite(self.rewards).all():
            i = int(np.flatnonzero(~np.isfinite(self.rewards))[0])
            raise MalformedRollout(f"completions[{i}].reward is not finite ({self.rewards[i]})")
        if not (np.isfinite(self.generation_s).all() and self.generation_s.min() >= 0):
            i = int(np.flatnonzero(~(np.isfinite(self.generation_s) & (self.generation_s >= 0)))[0])
            raise MalformedRollout(
                f"completions[{i}].generation_s must be a finite non-negative number"
            )

    @staticmethod
    def _fail(sizes: np.ndarray, bad: np.ndarray, message: str) -> None:
        """Raise for the completion holding the first bad element; `sizes`: its elements each."""
        i = int(np.searchsorted(np.cumsum(sizes), int(np.flatnonzero(bad)[0]), side="right"))
        raise MalformedRollout(f"completions[{i}].{message}")

    def completions(self) -> list[Completion]:
        """Per-completion objects whose arrays are views into these columns (no copies)."""
        token_ends = np.cumsum(self.completion_lengths).tolist()
        run_ends = np.cumsum(self.runs_per_completion).tolist()
        out = []
        token_start = run_start = 0
        for i, (token_end, run_end) in enumerate(zip(token_ends, run_ends, strict=True)):
            tokens = slice(token_start, token_end)
            runs = slice(run_start, run_end)
            out.append(
                Completion(
                    token_ids=self.token_ids[tokens],
                    behaviour_logprobs=self.behaviour_logprobs[tokens],
                    loss_mask=self.loss_mask[tokens],
                    policy_versions=VersionRuns(
                        self.version_values[runs], self.version_lengths[runs]
                    ),
                    reward=float(self.rewards[i]),
                    finish_reason=self.finish_reasons[i],
                    verifier_details=self.verifier_details[i],
                    generation_s=float(self.generation_s[i]),
                )
            )
            token_start, run_start = token_end, run_end
        return out


def check_columns(groups: Sequence[GroupColumns]) -> list[MalformedRollout | None]:
    """Validate many groups at once: what is wrong with each, or None where it is valid.

    The same contract as `GroupColumns.validate`, checked on the groups' columns
    concatenated (`BatchColumns.errors`): a few numpy calls for a whole chunk of groups
    instead of a few dozen per group.
    """
    errors: list[MalformedRollout | None] = [None] * len(groups)
    for indices, join_tokens in plan_batches([g.token_ids.size for g in groups]):
        batch = BatchColumns.of([groups[i] for i in indices], join_tokens)
        for i, error in zip(indices, batch.errors(), strict=True):
            errors[i] = error
    return errors


_CHUNK_TOKENS = 65536
"""Small groups are concatenated for checking until a chunk holds this many tokens: enough
to amortise numpy's per-call cost."""
_BIG_TOKENS = 16384
"""Groups of this many tokens or more are not worth copying into one array (measured: 4x
slower for 8 x 4,096): their token columns are checked group by group, and only their
other, small columns are joined."""


def plan_batches(token_counts: Sequence[int]) -> list[tuple[list[int], bool]]:
    """Which groups to check together, given each group's number of tokens, and whether
    to join their token columns: small groups by chunks, joined; big groups all at once,
    their token columns per group."""
    plan: list[tuple[list[int], bool]] = []
    chunk: list[int] = []
    big: list[int] = []
    tokens = 0
    for i, size in enumerate(token_counts):
        if size >= _BIG_TOKENS:
            big.append(i)
            continue
        chunk.append(i)
        tokens += size
        if tokens >= _CHUNK_TOKENS:
            plan.append((chunk, True))
            chunk, tokens = [], 0
    if chunk:
        plan.append((chunk, True))
    if big:
        plan.append((big, False))
    return plan


NUMERIC_COLUMNS = (
    "prompt_token_ids", "completion_lengths", "token_ids", "behaviour_logprobs", "loss_mask",
    "version_values", "version_lengths", "runs_per_completion", "rewards", "generation_s",
)  # fmt: skip
"""`GroupColumns`' arrays, in the order `BatchColumns` and the wire format keep them."""
TOKEN_COLUMNS = frozenset(
    NUMERIC_COLUMNS.index(name) for name in ("token_ids", "behaviour_logprobs", "loss_mask")
)
"""Indices of the columns with an entry per token."""


@dataclass(frozen=True)
class Limits:
    """What the learner can take, beyond a well-formed group: token ids in the model's
    vocabulary, sequences the engine's window holds, versions the learner has reached."""

    vocab_size: int | None = None
    max_tokens: int | None = None
    max_version: int | None = None


@dataclass(frozen=True, eq=False)
class BatchColumns:
    """Several groups' columns concatenated: one array per column for all of them.

    `bounds[k]` holds where each group's entries of column k start, then the end: group
    i's part of column k is `arrays[k][bounds[k][i]:bounds[k][i + 1]]`. Validation runs
    on the whole batch at once, and decoded groups are views into it.

    Big groups' token columns are not worth copying into one array: for them
    `arrays[k]` of a token column is a list of each group's array instead, and the
    checks of those columns run group by group (the other columns are still joined).
    """

    arrays: list[np.ndarray | list[np.ndarray]]
    """The numeric columns, in `NUMERIC_COLUMNS` order; token columns may be per group."""
    bounds: list[list[int]]
    finish_reasons: list[list[FinishReason]]
    """Per group."""
    verifier_details: list[list[VerifierDetails]]
    """Per group."""

    @classmethod
    def of(cls, groups: Sequence[GroupColumns], join_tokens: bool = True) -> BatchColumns:
        """Concatenate groups' columns (no copy for a single group); with `join_tokens`
        False, the token columns stay per group."""
        columns = [[getattr(g, name) for g in groups] for name in NUMERIC_COLUMNS]
        arrays: list[np.ndarray | list[np.ndarray]] = []
        for k, parts in enumerate(columns):
            if not join_tokens and k in TOKEN_COLUMNS:
                arrays.append(parts)
            else:
                arrays.append(parts[0] if len(parts) == 1 else np.concatenate(parts))
        return cls(
            arrays,
            [list(itertools.accumulate((a.size for a in parts), initial=0)) for parts in columns],
            [g.finish_reasons for g in groups],
            [g.verifier_details for g in groups],
        )

    def __len__(self) -> int:
        return len(self.finish_reasons)

    def group(self, i: int) -> GroupColumns:
        """Group i's columns: views into the batch's arrays."""
        views = {
            name: array[i] if type(array) is list else array[bounds[i] : bounds[i + 1]]
            for name, array, bounds in zip(NUMERIC_COLUMNS, self.arrays, self.bounds, strict=True)
        }
        return GroupColumns(
            **views,
            finish_reasons=self.finish_reasons[i],
            verifier_details=self.verifier_details[i],
        )

    def outside(self, limits: Limits) -> list[str | None]:
        """Per group, the first of `limits` it breaks, or None; one pass over the batch
        (no group's columns are built). Call on groups that passed `errors`."""
        prompts, lengths, tokens, values = (self.arrays[k] for k in (0, 1, 2, 5))
        prompt_starts, completion_starts = self.bounds[0][:-1], self.bounds[1][:-1]
        top = np.maximum.reduceat(prompts, prompt_starts)
        if type(tokens) is list:
            top = np.maximum(top, [group.max() for group in tokens])
        else:
            top = np.maximum(top, np.maximum.reduceat(tokens, self.bounds[2][:-1]))
        longest = np.diff(self.bounds[0]) + np.maximum.reduceat(lengths, completion_starts)
        newest = np.maximum.reduceat(values, self.bounds[5][:-1])
        problems: list[str | None] = []
        for i in range(len(self)):
            if limits.vocab_size is not None and top[i] >= limits.vocab_size:
                problems.append(f"token id {top[i]} is outside the model's vocabulary "
                                f"({limits.vocab_size} ids)")  # fmt: skip
            elif limits.max_tokens is not None and longest[i] > limits.max_tokens:
                problems.append(f"prompt + completion is {longest[i]} tokens, over the "
                                f"engine's {limits.max_tokens}")  # fmt: skip
            elif limits.max_version is not None and newest[i] > limits.max_version:
                problems.append(f"holds tokens of version {newest[i]}, above the learner's "
                                f"{limits.max_version}")  # fmt: skip
            else:
                problems.append(None)
        return problems

    def errors(self) -> list[MalformedRollout | None]:
        """What is wrong with each group, or None; the one-by-one check runs only when
        the batch check finds something, to say which group and which completion."""
        if not len(self) or (self._sizes_agree() and self._values_valid()):
            return [None] * len(self)
        errors: list[MalformedRollout | None] = []
        for i in range(len(self)):
            try:
                self.group(i).validate()
            except MalformedRollout as error:
                errors.append(error)
            else:
                errors.append(None)
        return errors

    @functools.cached_property
    def _counts(self) -> list[list[int]]:
        """Per column, each group's number of entries."""
        if len(self) == 1:  # big groups come alone
            return [[bounds[1] - bounds[0]] for bounds in self.bounds]
        return [[end - start for start, end in itertools.pairwise(b)] for b in self.bounds]

    def _sizes_agree(self) -> bool:
        """The checks of `GroupColumns.validate` that need only sizes, from the bounds."""
        (
            prompts,
            completions,
            tokens,
            logprobs,
            mask,
            values,
            run_lengths,
            runs,
            rewards,
            seconds,
        ) = self._counts
        return (
            min(prompts) > 0
            and min(completions) > 0
            and runs == completions
            and rewards == completions
            and seconds == completions
            and [len(reasons) for reasons in self.finish_reasons] == completions
            and [len(details) for details in self.verifier_details] == completions
            and logprobs == tokens
            and mask == tokens
            and run_lengths == values
        )

    def _values_valid(self) -> bool:
        """`GroupColumns.validate` of every group (whose sizes agree) in one pass."""
        prompts, lengths, tokens, logprobs, mask, values, run_lengths, runs, rewards, seconds = (
            self.arrays
        )
        if prompts.min() < 0 or lengths.min() <= 0 or runs.min() <= 0:
            return False
        # Each group's completions cover exactly its tokens and runs. (Comparing lists:
        # np.array_equal costs 15x more for a few dozen groups.)
        starts = self.bounds[1][:-1]
        if (
            np.add.reduceat(lengths, starts, dtype=np.int64).tolist() != self._counts[2]
            or np.add.reduceat(runs, starts, dtype=np.int64).tolist() != self._counts[5]
        ):
            return False
        if type(tokens) is not list:  # joined, or per group (see the class)
            tokens, logprobs, mask = [tokens], [logprobs], [mask]
        for group_tokens, group_logprobs, group_mask in zip(tokens, logprobs, mask, strict=True):
            if group_tokens.min() < 0 or group_mask.view(np.uint8).max() > 1:
                return False
            # Finite everywhere (NaN fails both comparisons), sampled ones at most 0.
            if not (group_logprobs.min() > -np.inf and group_logprobs.max() < np.inf):
                return False
            # Single-turn completions are sampled throughout: no copy of the log-probs then.
            sampled = group_logprobs if group_mask.all() else group_logprobs[group_mask]
            if sampled.size and not sampled.max() <= LOGPROB_TOLERANCE:
                return False
        if values.min() < 0 or run_lengths.min() <= 0:
            return False
        run_starts = np.cumsum(runs, dtype=np.int64) - runs
        # Same shapes (the sizes agree): no need for np.array_equal's checks.
        if not (np.add.reduceat(run_lengths, run_starts, dtype=np.int64) == lengths).all():
            return False
        return bool(
            rewards.min() > -np.inf
            and rewards.max() < np.inf
            and seconds.min() >= 0
            and seconds.max() < np.inf
        )


class ColumnCompletions(Sequence[Completion]):
    """The completions of a group decoded from the buffer: its part of a `BatchColumns`.

    The group's `GroupColumns` and its `Completion` objects (views into the columns) are
    built the first time someone reads them, so decoding a batch does not pay for
    objects nobody reads.
    """

    __slots__ = ("_batch", "_built", "_columns", "_index")

    def __init__(self, batch: BatchColumns, index: int) -> None:
        self._batch = batch
        self._index = index
        self._columns: GroupColumns | None = None
        self._built: list[Completion] | None = None

    @property
    def columns(self) -> GroupColumns:
        if self._columns is None:
            self._columns = self._batch.group(self._index)
        return self._columns

    def _completions(self) -> list[Completion]:
        if self._built is None:
            self._built = self.columns.completions()
        return self._built

    def __len__(self) -> int:
        bounds = self._batch.bounds[1]
        return bounds[self._index + 1] - bounds[self._index]

    def __getitem__(self, index: int) -> Completion:  # type: ignore[override]
        return self._completions()[index]

    def __iter__(self) -> Iterator[Completion]:
        return iter(self._completions())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"ColumnCompletions({len(self)} completions)"


def _check_array(name: str, array: object, dtype: type) -> None:
    if not isinstance(array, np.ndarray) or array.ndim != 1:
        raise MalformedRollout(f"{name} must be a 1-D numpy array")
    if array.dtype != np.dtype(dtype):
        raise MalformedRollout(f"{name} has dtype {array.dtype}, expected {np.dtype(dtype)}")
