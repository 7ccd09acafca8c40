"""Spot checks re-verify a group from its prompt id and completion text with the trusted
side's own environment and tokenizer (the warm model's real tokenizer)."""

from __future__ import annotations

import dataclasses

import numpy as np

from actors.episodes import render_prompt
from actors.spot_check import RewardCheck
from buffer.schema import Completion, FinishReason, RolloutGroup, VersionRuns
from envs.arithmetic import ArithmeticConfig, ArithmeticEnv
from envs.calculator import CalculatorConfig, CalculatorEnv


def group_for(env, tokenizer, prompt_id: str, replies: dict[str, float]) -> RolloutGroup:
    """A group as an actor builds it: the prompt rendered, each reply tokenized, rewarded."""
    prompt = env.prompt_for_id(prompt_id)
    completions = []
    for reply, reward in replies.items():
        tokens = np.array(tokenizer(reply, add_special_tokens=False)["input_ids"], np.int32)
        completions.append(Completion(
            token_ids=tokens, behaviour_logprobs=np.full(len(tokens), -0.5, np.float32),
            loss_mask=np.ones(len(tokens), np.bool_),
            policy_versions=VersionRuns.constant(0, len(tokens)), reward=reward,
            finish_reason=FinishReason.STOP,
        ))  # fmt: skip
    return RolloutGroup(
        run_id="run", group_id="g", env_name=env.name, prompt_id=prompt_id,
        prompt_token_ids=np.array(render_prompt(tokenizer, prompt.messages), np.int32),
        completions=completions, actor_id="pool/a", created_at=1.7e9,
    )  # fmt: skip


def test_honest_groups_pass_and_forgeries_are_named(tokenizer) -> None:
    env = ArithmeticEnv(ArithmeticConfig())
    check = RewardCheck(env, tokenizer)
    honest = group_for(env, tokenizer, "arithmetic:12+30=", {"42": 1.0, "41": 0.0})
    assert check(honest) is None

    forged = group_for(env, tokenizer, "arithmetic:12+30=", {"42": 1.0, "41": 1.0})
    assert check(forged) == "spot check: completion 1 claims reward 1; the verifier gives 0"
    other_prompt = dataclasses.replace(
        honest, prompt_token_ids=group_for(env, tokenizer, "arithmetic:1+1=", {}).prompt_token_ids
    )
    assert "the prompt's tokens are not those of 'arithmetic:12+30='" in check(other_prompt)
    unknown = dataclasses.replace(honest, prompt_id="arithmetic:12/30=")
    assert "is not one of arithmetic's" in check(unknown)
    wrong_env = dataclasses.replace(honest, env_name="math")
    assert "env 'math', but this run's is 'arithmetic'" in check(wrong_env)
    assert check.unverifiable == 0


def test_multi_turn_episodes_are_counted_as_unverifiable(tokenizer) -> None:
    env = ArithmeticEnv(ArithmeticConfig())
    group = group_for(env, tokenizer, "arithmetic:1+1=", {"2": 1.0})
    check = RewardCheck(CalculatorEnv(CalculatorConfig()), tokenizer)
    assert check(dataclasses.replace(group, env_name="calculator")) is None
    assert check.unverifiable == 1
