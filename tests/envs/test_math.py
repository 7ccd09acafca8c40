"""`math`: the shipped JSONL, its loader's errors, and math-verify scoring."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from envs.base import EnvError, Message, Split
from envs.math_problems import SHIPPED_PROBLEMS, MathConfig, MathEnv, generate_problems


@pytest.fixture(scope="module")
def env() -> MathEnv:
    return MathEnv(MathConfig())


def test_shipped_file_is_what_the_generator_writes() -> None:
    shipped = [json.loads(line) for line in SHIPPED_PROBLEMS.read_text().splitlines()]
    assert shipped == generate_problems()


def test_splits_are_disjoint_and_deterministic(env: MathEnv) -> None:
    train = env.prompts(Split.TRAIN, 150, seed=0)
    test = env.prompts(Split.TEST, 40, seed=0)
    assert {p.prompt_id for p in train}.isdisjoint({p.prompt_id for p in test})
    assert test == env.prompts(Split.TEST, 40, seed=0)


@pytest.mark.parametrize(
    ("reference", "reply", "correct"),
    [
        ("\\frac{5}{6}", "The answer is \\boxed{\\frac{5}{6}}.", True),
        ("\\frac{5}{6}", "\\boxed{\\frac{10}{12}}", True),  # equivalent value
        ("\\frac{5}{6}", "\\boxed{5/6}", True),
        ("\\frac{5}{6}", "\\boxed{0.83}", False),
        ("-4", "x = \\boxed{-4}", True),
        ("-4", "\\boxed{4}", False),
        ("-4", "", False),
        ("-4", "I cannot solve this.", False),
        ("-4", "\\boxed{" + "9" * 5000 + "}", False),  # huge: refused by length
        ("-4", "\\boxed{-4", False),  # malformed LaTeX without the answer
        ("12", "\\boxed{3} or \\boxed{12}", False),  # hedging is judged on the first answer
    ],
)
def test_verifier(env: MathEnv, reference: str, reply: str, correct: bool) -> None:
    from envs.base import Prompt

    prompt = Prompt("math:t", (Message("user", "?"),), reference)
    verdict = env.verify(prompt, [Message("assistant", reply)])
    assert verdict.correct is correct
    assert verdict.reward == float(correct)


def test_every_shipped_answer_verifies_against_its_demonstration(env: MathEnv) -> None:
    for prompt in env.prompts(Split.TEST, 48, seed=0):
        assert env.verify(prompt, [Message("assistant", env.demonstration(prompt))]).correct


def test_verifier_works_off_the_main_thread(env: MathEnv) -> None:
    # math-verify's own timeout uses signals, which only the main thread may set.
    prompt = env.prompts(Split.TEST, 1, seed=0)[0]
    verdicts = []
    worker = threading.Thread(
        target=lambda: verdicts.append(
            env.verify(prompt, [Message("assistant", env.demonstration(prompt))])
        )
    )
    worker.start()
    worker.join()
    assert verdicts[0].correct


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json\n", "math.jsonl:1: not JSON"),
        ('{"id": "a", "problem": "p", "answer": "1"}\n', "field 'split'"),
        ('{"id": "a", "problem": "p", "answer": "1", "split": "dev"}\n', "split must be"),
        ("[1, 2]\n", "expected an object"),
        ("\n", "holds no problems"),
    ],
)
def test_bad_problem_files_name_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "math.jsonl"
    path.write_text(content)
    with pytest.raises(EnvError, match=message):
        MathEnv(MathConfig(path=path))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EnvError, match="does not exist"):
        MathEnv(MathConfig(path=tmp_path / "absent.jsonl"))
