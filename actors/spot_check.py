"""Spot checks of producers: re-verify a group from its prompt id and completion text,
on the learner's side, with the run's own environment and tokenizer.

The gate (buffer/gate.py) calls a `RewardCheck` on a random sample of the groups it
accepts. It catches a producer that forges rewards, that sends a prompt other than the
one its prompt id names, or a prompt id the environment never asks. It cannot catch
forged behaviour log-probs, groups it does not sample, nor anything in multi-turn
episodes or environments that cannot look a prompt up by id (those are counted as
unverifiable).
"""

from __future__ import annotations

import numpy as np

from actors.episodes import render_prompt
from buffer.schema import RolloutGroup
from envs.base import Environment, Message

REWARD_TOLERANCE = 1e-6


class RewardCheck:
    """`check(group)`: why the group's own record disagrees with the trusted verifier, or
    None when it agrees or cannot be checked (`unverifiable` counts those)."""

    def __init__(self, env: Environment, tokenizer: object) -> None:
        self.env = env
        self.tokenizer = tokenizer
        self.unverifiable = 0

    def __call__(self, group: RolloutGroup) -> str | None:
        lookup = getattr(self.env, "prompt_for_id", None)
        if lookup is None or getattr(self.env, "max_turns", 1) != 1:
            self.unverifiable += 1
            return None
        if group.env_name != self.env.name:
            return f"spot check: env {group.env_name!r}, but this run's is {self.env.name!r}"
        prompt = lookup(group.prompt_id)
        if prompt is None:
            return f"spot check: prompt id {group.prompt_id!r} is not one of {self.env.name}'s"
        expected = render_prompt(self.tokenizer, prompt.messages)
        if not np.array_equal(np.asarray(expected), group.prompt_token_ids):
            return f"spot check: the prompt's tokens are not those of {group.prompt_id!r}"
        for i, completion in enumerate(group.completions):
            reply = self.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
            reward = self.env.verify(prompt, [Message("assistant", reply)]).reward
            if abs(reward - completion.reward) > REWARD_TOLERANCE:
                return (
                    f"spot check: completion {i} claims reward {completion.reward:g}; the "
                    f"verifier gives {reward:g}"
                )
        return None
