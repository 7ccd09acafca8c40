"""`calculator`: a multi-turn task where the model may call a calculator tool.

The assistant writes `<calc>EXPRESSION</calc>` to use the tool; the environment answers
with a tool message `<result>VALUE</result>` and the episode continues. An assistant
message without a tool call is the final answer. Tool messages are environment tokens:
in context, masked out of the loss.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from envs.arithmetic import INTEGER_ANSWER
from envs.base import EnvError, EnvReply, Message, Prompt, Split, Verdict, final_answer

_CALL = re.compile(r"<calc>(.{1,200}?)</calc>", re.DOTALL)
_MAX_ABS = 10**12
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


class CalculatorConfig(BaseModel):
    """Multi-step arithmetic with a calculator tool."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["calculator"] = "calculator"
    max_turns: int = Field(4, ge=1, le=32)
    """Assistant turns per episode (tool calls plus the final answer)."""
    digits: int = Field(3, ge=1, le=6)
    """Operands are drawn from 0 .. 10**digits - 1."""


class CalculatorEnv:
    """Multi-turn: compute `a*b+c`, optionally with `<calc>` tool calls; exact-match reward."""

    name = "calculator"

    def __init__(self, config: CalculatorConfig) -> None:
        self.config = config
        self.max_turns = config.max_turns

    def prompts(self, split: Split, count: int, seed: int) -> list[Prompt]:
        rng = np.random.default_rng([seed, 2 if split is Split.TRAIN else 3])
        high = 10**self.config.digits
        prompts: dict[str, Prompt] = {}
        for _ in range(count * 50):
            if len(prompts) == count:
                break
            a, b, c = (int(x) for x in rng.integers(0, high, size=3))
            # Odd c for test, even for train: the splits never share a problem.
            if (c % 2 == 1) != (split is Split.TEST):
                continue
            text = f"{a}*{b}+{c}"
            prompts.setdefault(
                text,
                Prompt(
                    prompt_id=f"calculator:{text}",
                    messages=(Message("user", f"Compute {text}. Use <calc>...</calc> if needed."),),
                    reference=str(a * b + c),
                ),
            )
        if len(prompts) < count:
            raise EnvError(f"calculator: found {len(prompts)} distinct prompts, asked for {count}")
        return list(prompts.values())

    def step(self, prompt: Prompt, transcript: Sequence[Message]) -> EnvReply:
        call = _CALL.search(final_answer(transcript))
        if call is None:
            return EnvReply(done=True)
        return EnvReply(
            done=False, message=Message("tool", f"<result>{evaluate(call.group(1))}</result>")
        )

    def verify(self, prompt: Prompt, transcript: Sequence[Message]) -> Verdict:
        answer = final_answer(transcript).strip()
        tool_calls = sum(1 for m in transcript if m.role == "tool")
        if _CALL.search(answer) or not INTEGER_ANSWER.fullmatch(answer):
            return Verdict(
                0.0, False, {"reason": "no final integer answer", "tool_calls": tool_calls}
            )
        correct = int(answer) == int(prompt.reference)
        return Verdict(float(correct), correct, {"extracted": answer, "tool_calls": tool_calls})

    def demonstration(self, prompt: Prompt) -> str | None:
        return prompt.reference  # answering directly, without the tool, is correct


def evaluate(expression: str) -> str:
    """Evaluate integer arithmetic (+ - * // % and parentheses) safely; errors become text."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        return str(_evaluate(tree.body))
    except (SyntaxError, ValueError, ZeroDivisionError) as error:
        return f"error: {type(error).__name__}"


def _evaluate(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        value = node.value
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = -_evaluate(node.operand)
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        value = _BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    else:
        raise ValueError("unsupported expression")
    if abs(value) > _MAX_ABS:
        raise ValueError("number too large")
    return value
