"""`copy`: repeat a string of digits exactly; its length is heavy-tailed.

Most strings are a few digits long and a few are dozens, so the replies' lengths, and with
them the time each episode takes to generate, vary by an order of magnitude: the case
where a synchronous loop waits for its slowest episode and an asynchronous one does not.
A tiny model learns it from a short warm start; the long strings are where RL has
something left to do.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from envs.base import EnvError, Message, Prompt, SingleTurnEnvironment, Split, Verdict

_MAX_ATTEMPTS_PER_PROMPT = 50


class CopyConfig(BaseModel):
    """Copy a digit string whose length L is drawn with P(L) ∝ L^-length_exponent."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["copy"] = "copy"
    min_length: int = Field(3, ge=1)
    """Shortest string, in digits. Strings are split between train and test by a hash, so
    a length with few distinct strings (ten of one digit) may have none in the test split:
    from 3 digits on, both splits see the same length distribution."""
    max_length: int = Field(64, ge=1, le=1000)
    """Longest string, in digits."""
    length_exponent: float = Field(1.7, ge=0)
    """P(L) ∝ L^-length_exponent on [min_length, max_length]: 0 is uniform; at the
    defaults the replies' 99th percentile (in tokens, end of turn included) is about 8.5
    times their median (7 and 60)."""
    test_percent: int = Field(10, ge=1, le=50)
    """Share of all strings (by a stable hash) kept for the held-out split."""
    question: str = "copy {digits}"
    """How the string is shown; `{digits}` is replaced by it."""

    @model_validator(mode="after")
    def _lengths_in_order(self) -> CopyConfig:
        if self.min_length > self.max_length:
            raise ValueError(f"min_length={self.min_length} exceeds max_length={self.max_length}")
        if "{digits}" not in self.question:
            raise ValueError("question must contain {digits}, where the string goes")
        return self


def string_split(digits: str, test_percent: int) -> Split:
    """Which split a string belongs to: a stable hash, identical on every machine."""
    digest = hashlib.blake2b(f"copy:{digits}".encode(), digest_size=8).digest()
    return Split.TEST if int.from_bytes(digest, "little") % 100 < test_percent else Split.TRAIN


class CopyEnv(SingleTurnEnvironment):
    """Single-turn copying with an exact-match verifier."""

    name = "copy"

    def __init__(self, config: CopyConfig) -> None:
        self.config = config
        lengths = np.arange(config.min_length, config.max_length + 1)
        weights = lengths.astype(float) ** -config.length_exponent
        self._lengths, self._probabilities = lengths, weights / weights.sum()

    def prompts(self, split: Split, count: int, seed: int) -> list[Prompt]:
        """Independent draws, repeats allowed: deduplicating would thin out the short
        strings (there are only ten of one digit) and bend the length distribution."""
        rng = np.random.default_rng([seed, 0 if split is Split.TRAIN else 1, 7])
        chosen: list[Prompt] = []
        for _ in range(count * _MAX_ATTEMPTS_PER_PROMPT):
            if len(chosen) == count:
                break
            length = int(rng.choice(self._lengths, p=self._probabilities))
            digits = "".join(str(d) for d in rng.integers(0, 10, size=length))
            if string_split(digits, self.config.test_percent) is split:
                chosen.append(self._prompt(digits))
        if len(chosen) < count:
            raise EnvError(f"copy: found {len(chosen)} of {count} {split.value} prompts")
        return chosen

    def _prompt(self, digits: str) -> Prompt:
        question = self.config.question.replace("{digits}", digits)
        return Prompt(f"copy:{digits}", (Message("user", question),), digits)

    def prompt_for_id(self, prompt_id: str) -> Prompt | None:
        """The prompt `prompt_id` names (for re-verifying a producer's rewards), or None."""
        digits = prompt_id.removeprefix("copy:")
        if not (prompt_id.startswith("copy:") and digits.isdigit() and digits.isascii()):
            return None
        return self._prompt(digits)

    def score(self, prompt: Prompt, response: str) -> Verdict:
        correct = response.strip() == prompt.reference
        return Verdict(float(correct), correct, {"length": len(prompt.reference)})
