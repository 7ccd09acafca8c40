"""`arithmetic`: integer problems like "12+34=", difficulty set by digits and operators."""

from __future__ import annotations

import hashlib
import re
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from envs.base import EnvError, Message, Prompt, SingleTurnEnvironment, Split, Verdict

Operator = Literal["+", "-", "*"]
INTEGER_ANSWER = re.compile(r"-?\d{1,30}")
"""A reply that is one integer and nothing else (bounded length, so no huge ints)."""
_MAX_ATTEMPTS_PER_PROMPT = 50


class ArithmeticConfig(BaseModel):
    """Integer arithmetic: `a OP b=` answered by the integer result."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["arithmetic"] = "arithmetic"
    digits: int = Field(2, ge=1, le=9)
    """Operands are drawn uniformly from 0 .. 10**digits - 1."""
    operators: list[Operator] = Field(default_factory=lambda: ["+"], min_length=1)
    """Operators to draw from."""
    test_percent: int = Field(10, ge=1, le=50)
    """Share of all problems (by a stable hash) kept for the held-out split."""
    question: str = "{problem}="
    """How a problem is asked; `{problem}` becomes e.g. "12+34". Chat models want words:
    "What is {problem}? Answer with the number only."."""
    answer: Literal["exact", "last_integer"] = "exact"
    """exact: the reply is one integer and nothing else; last_integer: the reply's last
    integer is the answer (for chat models that answer "12 + 34 = 46")."""

    @field_validator("question")
    @classmethod
    def _has_problem(cls, question: str) -> str:
        if "{problem}" not in question:
            raise ValueError("must contain {problem}, where the problem goes")
        return question


def problem_split(a: int, op: str, b: int, test_percent: int) -> Split:
    """Which split a problem belongs to: a stable hash, identical on every machine."""
    digest = hashlib.blake2b(f"{a}{op}{b}".encode(), digest_size=8).digest()
    return Split.TEST if int.from_bytes(digest, "little") % 100 < test_percent else Split.TRAIN


class ArithmeticEnv(SingleTurnEnvironment):
    """Single-turn integer arithmetic with an exact-match verifier."""

    name = "arithmetic"

    def __init__(self, config: ArithmeticConfig) -> None:
        self.config = config

    def prompts(self, split: Split, count: int, seed: int) -> list[Prompt]:
        rng = np.random.default_rng([seed, 0 if split is Split.TRAIN else 1])
        high = 10**self.config.digits
        chosen: dict[str, Prompt] = {}
        for _ in range(count * _MAX_ATTEMPTS_PER_PROMPT):
            if len(chosen) == count:
                break
            a, b = (int(x) for x in rng.integers(0, high, size=2))
            op = self.config.operators[int(rng.integers(len(self.config.operators)))]
            if problem_split(a, op, b, self.config.test_percent) is not split:
                continue
            chosen.setdefault(f"{a}{op}{b}=", self._prompt(a, op, b))
        if len(chosen) < count:
            raise EnvError(
                f"arithmetic: asked for {count} distinct {split.value} prompts, found "
                f"{len(chosen)}; use fewer prompts or more env.digits"
            )
        return list(chosen.values())

    def _prompt(self, a: int, op: str, b: int) -> Prompt:
        text = f"{a}{op}{b}="
        return Prompt(
            prompt_id=f"arithmetic:{text}",
            messages=(Message("user", self.config.question.replace("{problem}", text[:-1])),),
            reference=str(_apply(a, op, b)),
        )

    def prompt_for_id(self, prompt_id: str) -> Prompt | None:
        """The prompt `prompt_id` names (for re-verifying a producer's rewards), or None."""
        found = re.fullmatch(r"arithmetic:(\d+)([-+*])(\d+)=", prompt_id)
        if found is None or found[2] not in self.config.operators:
            return None
        return self._prompt(int(found[1]), found[2], int(found[3]))

    def score(self, prompt: Prompt, response: str) -> Verdict:
        answer = response.strip()
        if self.config.answer == "last_integer":
            found = INTEGER_ANSWER.findall(answer[-200:])
            answer = found[-1] if found else ""
        if not INTEGER_ANSWER.fullmatch(answer):
            return Verdict(0.0, False, {"extracted": None, "reason": "not a single integer"})
        correct = int(answer) == int(prompt.reference)
        return Verdict(float(correct), correct, {"extracted": answer})


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b
