"""`code`: correct code passes, wrong and cheating replies do not (escapes: test_sandbox)."""

from __future__ import annotations

import pytest

from envs.base import Message, Split
from envs.code_tests import TASKS, CodeConfig, CodeEnv, extract_code

FORGED_VERDICT = (
    'print(\'{"returned": [{"value": 3}, {"value": 0}, {"value": 42}]}\')\n'
    "def add(a, b): return None"
)


@pytest.fixture(scope="module")
def env() -> CodeEnv:
    return CodeEnv(CodeConfig(timeout_s=3.0, memory_mb=256))


def verdict_for(env: CodeEnv, function: str, reply: str) -> object:
    prompt = next(
        p
        for split in Split
        for p in env.prompts(split, _count(split), 0)
        if p.reference == function
    )
    return env.verify(prompt, [Message("assistant", reply)])


def _count(split: Split) -> int:
    return sum(task.split is split for task in TASKS.values())


def test_correct_solution_scores_one(env: CodeEnv) -> None:
    verdict = verdict_for(env, "add", "```python\ndef add(a, b):\n    return a + b\n```")
    assert (verdict.reward, verdict.correct) == (1.0, True)
    assert verdict.details["passed"] == 3


def test_partial_solution_scores_its_fraction(env: CodeEnv) -> None:
    # 1+2 -> 3 passes; -5+5 -> 0 and 10+32 -> 42 fail: 1 of 3.
    verdict = verdict_for(env, "add", "def add(a, b):\n    return 3")
    assert verdict.reward == pytest.approx(1 / 3)
    assert not verdict.correct


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "def add(a, b):\n    return a +",  # syntax error
        "def plus(a, b):\n    return a + b",  # wrong name
        "print('3\\n0\\n42')\ndef add(a, b):\n    return None",  # printing the expected output
        FORGED_VERDICT,  # imitating the harness's own verdict
        "import sys\nsys.exit(0)",
        "import os\nos._exit(0)",
        "def add(a, b):\n    return True",  # True == 1 must not pass for an int
        "def add(a, b):\n    while True: pass",  # time limit
        "x = bytearray(10**10)",  # memory limit
        "x" * 9000,  # over max_code_chars
    ],
)
def test_wrong_or_cheating_replies_score_zero(env: CodeEnv, reply: str) -> None:
    verdict = verdict_for(env, "add", reply)
    assert verdict.reward == 0.0
    assert not verdict.correct


def test_extract_code_prefers_the_last_fenced_block() -> None:
    reply = "first:\n```python\nx = 1\n```\nfinal:\n```\ny = 2\n```"
    assert extract_code(reply) == "y = 2\n"
    assert extract_code("z = 3") == "z = 3"
