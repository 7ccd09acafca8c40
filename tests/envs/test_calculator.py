"""`calculator`: the multi-turn tool loop and its safe evaluator."""

from __future__ import annotations

import pytest

from envs.base import Message, Prompt, Split
from envs.calculator import CalculatorConfig, CalculatorEnv, evaluate


@pytest.fixture
def env() -> CalculatorEnv:
    return CalculatorEnv(CalculatorConfig(max_turns=3))


@pytest.fixture
def prompt() -> Prompt:
    return Prompt("calculator:12*3+5", (Message("user", "Compute 12*3+5."),), "41")


def test_a_tool_call_gets_a_tool_reply(env: CalculatorEnv, prompt: Prompt) -> None:
    reply = env.step(prompt, [Message("assistant", "<calc>12*3</calc>")])
    assert not reply.done
    assert reply.message == Message("tool", "<result>36</result>")


def test_a_plain_answer_ends_the_episode(env: CalculatorEnv, prompt: Prompt) -> None:
    transcript = [
        Message("assistant", "<calc>12*3</calc>"),
        Message("tool", "<result>36</result>"),
        Message("assistant", "41"),
    ]
    assert env.step(prompt, transcript).done
    verdict = env.verify(prompt, transcript)
    assert verdict.correct
    assert verdict.details["tool_calls"] == 1


@pytest.mark.parametrize(
    "final",
    ["<calc>12*3+5</calc>", "", "41 or 42", "the answer is 41", "1" * 40],
)
def test_no_final_integer_is_wrong(env: CalculatorEnv, prompt: Prompt, final: str) -> None:
    assert not env.verify(prompt, [Message("assistant", final)]).correct


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("1+2*3", "7"),
        ("(1+2)*3", "9"),
        ("-4//3", "-2"),
        ("7 % 4", "3"),
        ("1/0", "error: ValueError"),  # true division is not offered
        ("1//0", "error: ZeroDivisionError"),
        ("__import__('os').system('true')", "error: ValueError"),
        ("2**1000", "error: ValueError"),
        ("10**6*10**6*10", "error: ValueError"),
        ("1.5+1", "error: ValueError"),
        ("", "error: SyntaxError"),
    ],
)
def test_evaluate_is_safe(expression: str, value: str) -> None:
    assert evaluate(expression) == value


def test_splits_are_disjoint(env: CalculatorEnv) -> None:
    train = {p.prompt_id for p in env.prompts(Split.TRAIN, 500, 0)}
    test = {p.prompt_id for p in env.prompts(Split.TEST, 200, 0)}
    assert train.isdisjoint(test)
