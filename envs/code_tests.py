"""`code`: write a Python function, checked against test cases in the sandbox."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from envs.base import EnvError, Message, Prompt, SingleTurnEnvironment, Split, Verdict
from envs.sandbox import require_sandbox, run_function

_FENCE = re.compile(r"```(?:python|py)?\n(.*?)```", re.DOTALL)


class CodeConfig(BaseModel):
    """Function-writing tasks verified by running tests in a sandboxed subprocess."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["code"] = "code"
    timeout_s: float = Field(3.0, gt=0, le=60)
    """Wall-clock limit for one program (all of its test cases)."""
    memory_mb: int = Field(256, ge=64, le=8192)
    """Address-space limit of the sandboxed interpreter."""
    max_code_chars: int = Field(8000, gt=0)
    """Longer replies are scored 0 without being run."""


@dataclass(frozen=True)
class CodeTask:
    """A function to write and the cases (arguments, expected value) it must get right."""

    function: str
    signature: str
    description: str
    cases: tuple[tuple[tuple[Any, ...], Any], ...]
    split: Split


TASKS: dict[str, CodeTask] = {
    task.function: task
    for task in (
        CodeTask(
            "add",
            "add(a, b)",
            "returns a + b",
            (((1, 2), 3), ((-5, 5), 0), ((10, 32), 42)),
            Split.TRAIN,
        ),
        CodeTask(
            "double",
            "double(x)",
            "returns 2 * x",
            (((0,), 0), ((7,), 14), ((-3,), -6)),
            Split.TRAIN,
        ),
        CodeTask(
            "is_even",
            "is_even(n)",
            "returns True when n is even",
            (((4,), True), ((7,), False), ((0,), True)),
            Split.TRAIN,
        ),
        CodeTask(
            "reverse",
            "reverse(s)",
            "returns the string s reversed",
            ((("abc",), "cba"), (("",), ""), (("ab",), "ba")),
            Split.TRAIN,
        ),
        CodeTask(
            "maximum",
            "maximum(a, b, c)",
            "returns the largest of a, b, c",
            (((1, 2, 3), 3), ((9, 2, 3), 9), ((-1, -2, -3), -1)),
            Split.TRAIN,
        ),
        CodeTask(
            "count_vowels",
            "count_vowels(s)",
            "returns how many of a, e, i, o, u are in s",
            ((("hello",), 2), (("xyz",), 0), (("aeiou",), 5)),
            Split.TRAIN,
        ),
        CodeTask(
            "square", "square(x)", "returns x * x", (((3,), 9), ((-4,), 16), ((0,), 0)), Split.TRAIN
        ),
        CodeTask(
            "absolute",
            "absolute(x)",
            "returns the absolute value of x",
            (((-3,), 3), ((5,), 5), ((0,), 0)),
            Split.TRAIN,
        ),
        CodeTask(
            "first",
            "first(xs)",
            "returns the first element of the list xs",
            ((([1, 2],), 1), ((["a"],), "a"), (([0, 9],), 0)),
            Split.TRAIN,
        ),
        CodeTask(
            "subtract",
            "subtract(a, b)",
            "returns a - b",
            (((5, 3), 2), ((0, 4), -4), ((7, 7), 0)),
            Split.TEST,
        ),
        CodeTask(
            "triple", "triple(x)", "returns 3 * x", (((2,), 6), ((-1,), -3), ((0,), 0)), Split.TEST
        ),
        CodeTask(
            "is_odd",
            "is_odd(n)",
            "returns True when n is odd",
            (((3,), True), ((8,), False), ((0,), False)),
            Split.TEST,
        ),
        CodeTask(
            "length",
            "length(xs)",
            "returns the number of elements of xs",
            ((([1, 2, 3],), 3), (([],), 0), ((["a"],), 1)),
            Split.TEST,
        ),
    )
}


def _prompt(task: CodeTask) -> Prompt:
    request = f"Write a Python function {task.signature} that {task.description}."
    return Prompt(f"code:{task.function}", (Message("user", request),), task.function)


class CodeEnv(SingleTurnEnvironment):
    """Single-turn code writing; reward is the fraction of test cases passed."""

    name = "code"

    def __init__(self, config: CodeConfig) -> None:
        require_sandbox()  # at start-up, naming what to install, not at the first reply
        self.config = config

    def prompts(self, split: Split, count: int, seed: int) -> list[Prompt]:
        tasks = [task for task in TASKS.values() if task.split is split]
        if count > len(tasks):
            raise EnvError(f"code: {len(tasks)} {split.value} tasks exist, asked for {count}")
        start = seed % len(tasks)
        chosen = (tasks[start:] + tasks[:start])[:count]
        return [_prompt(task) for task in chosen]

    def prompt_for_id(self, prompt_id: str) -> Prompt | None:
        """The prompt `prompt_id` names (for re-verifying a producer's rewards), or None."""
        task = TASKS.get(prompt_id.removeprefix("code:"))
        return _prompt(task) if task is not None and prompt_id.startswith("code:") else None

    def score(self, prompt: Prompt, response: str) -> Verdict:
        task = TASKS.get(prompt.reference)
        if task is None:
            raise EnvError(f"code: unknown task {prompt.reference!r}")
        if len(response) > self.config.max_code_chars:
            return Verdict(0.0, False, {"reason": f"reply over {self.config.max_code_chars} chars"})
        code = extract_code(response)
        if not code.strip():
            return Verdict(0.0, False, {"reason": "no code"})
        result = run_function(
            code,
            task.function,
            [list(args) for args, _ in task.cases],
            timeout_s=self.config.timeout_s,
            memory_mb=self.config.memory_mb,
        )
        if result.returned is None or len(result.returned) != len(task.cases):
            return Verdict(0.0, False, {"reason": result.error or "wrong number of results"})
        passed = sum(
            "value" in got and _same(got["value"], expected)
            for got, (_, expected) in zip(result.returned, task.cases, strict=True)
        )
        details = {"passed": passed, "total": len(task.cases)}
        return Verdict(passed / len(task.cases), passed == len(task.cases), details)

    def demonstration(self, prompt: Prompt) -> str | None:
        return None  # no reference solutions: warm start does not apply to `code`


def extract_code(response: str) -> str:
    """The last fenced code block of a reply, or the whole reply when it has none."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def _same(got: Any, expected: Any) -> bool:
    # bool is an int in Python: True must not pass for 1, nor 1 for True.
    return type(got) is type(expected) and got == expected
