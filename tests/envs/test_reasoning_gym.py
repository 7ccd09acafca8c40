"""reasoning-gym datasets as environments: splits apart, their own verifiers, config passed on."""

from __future__ import annotations

import pytest

from envs.base import EnvError, Message, Split
from envs.reasoning_gym_env import ReasoningGymConfig, ReasoningGymEnv
from relay.config import load_config
from relay.errors import ConfigError

DATASETS = ("countdown", "basic_arithmetic", "word_sorting")


@pytest.mark.parametrize("name", DATASETS)
def test_each_dataset_serves_disjoint_splits_scored_by_its_own_verifier(name: str) -> None:
    env = ReasoningGymEnv(ReasoningGymConfig(dataset=name))
    train = env.prompts(Split.TRAIN, 30, seed=3)
    test = env.prompts(Split.TEST, 30, seed=3)
    assert len(train) == len(test) == 30
    assert not {p.prompt_id for p in train} & {p.prompt_id for p in test}
    assert [p.messages[-1].content for p in train] != [p.messages[-1].content for p in test]
    assert env.prompts(Split.TRAIN, 30, seed=3) == train  # deterministic in the seed
    for prompt in train[:10]:
        right = env.verify(prompt, [Message("assistant", env.demonstration(prompt))])
        assert right.correct and right.reward == 1.0, (prompt, right)
        wrong = env.verify(prompt, [Message("assistant", "no idea")])
        assert not wrong.correct and wrong.reward < 1.0


def test_the_datasets_config_is_passed_through_and_tagged_answers_are_read() -> None:
    env = ReasoningGymEnv(
        ReasoningGymConfig(dataset="countdown", config={"min_numbers": 3, "max_numbers": 3})
    )
    prompts = env.prompts(Split.TRAIN, 20, seed=0)
    fresh = ReasoningGymEnv(env.config)  # another instance: scores from the id's seed alone
    for prompt in prompts:
        numbers = env._entries[prompt.prompt_id]["metadata"]["numbers"]
        assert len(numbers) == 3 and all(str(n) in prompt.messages[-1].content for n in numbers)
        reply = f"Let me think. <answer>{prompt.reference}</answer>"
        assert fresh.verify(prompt, [Message("assistant", reply)]).correct


def test_configuration_errors_name_the_field() -> None:
    config = load_config(None, ["env.type=reasoning_gym", "env.dataset=countdown"], environ={})
    assert config.env.dataset == "countdown"
    with pytest.raises(
        ConfigError, match=r"env\.dataset: value error, unknown reasoning-gym dataset 'chess'"
    ):
        load_config(None, ["env.type=reasoning_gym", "env.dataset=chess"], environ={})
    with pytest.raises(EnvError, match=r"env\.config for reasoning-gym dataset 'countdown'"):
        ReasoningGymEnv(ReasoningGymConfig(dataset="countdown", config={"numbers": 3}))
