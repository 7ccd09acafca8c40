"""`arithmetic`: deterministic prompts, disjoint splits, exact-match verifier."""

from __future__ import annotations

import pytest

from envs.arithmetic import ArithmeticConfig, ArithmeticEnv
from envs.base import EnvError, Message, Split


@pytest.fixture
def env() -> ArithmeticEnv:
    return ArithmeticEnv(ArithmeticConfig(digits=2, operators=["+", "-", "*"]))


def test_prompts_are_deterministic_and_distinct(env: ArithmeticEnv) -> None:
    first = env.prompts(Split.TRAIN, 200, seed=7)
    assert first == env.prompts(Split.TRAIN, 200, seed=7)
    assert first != env.prompts(Split.TRAIN, 200, seed=8)
    assert len({p.prompt_id for p in first}) == 200


def test_train_and_test_never_share_a_problem(env: ArithmeticEnv) -> None:
    train = {p.prompt_id for p in env.prompts(Split.TRAIN, 3000, seed=0)}
    test = {p.prompt_id for p in env.prompts(Split.TEST, 500, seed=0)}
    assert train.isdisjoint(test)


def test_references_are_the_results(env: ArithmeticEnv) -> None:
    for prompt in env.prompts(Split.TEST, 50, seed=1):
        expression = prompt.messages[0].content.rstrip("=")
        assert int(prompt.reference) == eval(expression)  # the env's own small integer expressions


@pytest.mark.parametrize(
    ("reply", "reward"),
    [
        ("46", 1.0),
        (" 46 ", 1.0),  # surrounding whitespace is not the answer's fault
        ("046", 1.0),  # the same integer
        ("47", 0.0),
        ("", 0.0),
        ("46 47", 0.0),  # listing candidates must not earn the reward
        ("46\n47", 0.0),
        ("12+34=46", 0.0),
        ("forty-six", 0.0),
        ("4" * 10_000, 0.0),  # huge: rejected by length before int() is tried
        ("<|im_end|>46", 0.0),
    ],
)
def test_verifier(env: ArithmeticEnv, reply: str, reward: float) -> None:
    prompt = next(p for p in env.prompts(Split.TRAIN, 5000, seed=0) if p.reference == "46")
    verdict = env.verify(prompt, [Message("assistant", reply)])
    assert verdict.reward == reward
    assert verdict.correct is (reward == 1.0)


def test_asking_for_more_prompts_than_exist_is_an_error() -> None:
    one_digit = ArithmeticEnv(ArithmeticConfig(digits=1))
    with pytest.raises(EnvError, match=r"env\.digits"):
        one_digit.prompts(Split.TEST, 90, seed=0)


def test_a_question_in_words_scored_on_its_last_integer() -> None:
    words = ArithmeticEnv(ArithmeticConfig(question="What is {problem}? Number only.",
                                           answer="last_integer"))  # fmt: skip
    plain = ArithmeticEnv(ArithmeticConfig())
    asked, bare = words.prompts(Split.TEST, 5, seed=2), plain.prompts(Split.TEST, 5, seed=2)
    # The same problems and ids, only asked differently.
    assert [p.prompt_id for p in asked] == [p.prompt_id for p in bare]
    a, b = bare[0].messages[0].content[:-1].split("+")
    assert asked[0].messages == (Message("user", f"What is {a}+{b}? Number only."),)
    total = int(a) + int(b)
    assert words.score(asked[0], f"{a} + {b} = {total}").correct
    assert not words.score(asked[0], f"{a} + {b} = {total + 1}").correct
    assert not words.score(asked[0], "I do not know").correct
    assert not plain.score(bare[0], f"{a} + {b} = {total}").correct  # exact: one integer only
    with pytest.raises(ValueError, match=r"must contain \{problem\}"):
        ArithmeticConfig(question="What is it?")
