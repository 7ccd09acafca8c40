"""Every registered environment satisfies the protocol and is built from its config."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter

from envs.base import Environment, Split
from envs.registry import ENVIRONMENTS, EnvConfig, make_env


@pytest.mark.parametrize("name", sorted(ENVIRONMENTS))
def test_make_env_builds_each_type(name: str) -> None:
    env = make_env(TypeAdapter(EnvConfig).validate_python({"type": name}))
    assert isinstance(env, Environment)
    assert env.name == name
    prompts = env.prompts(Split.TEST, 2, seed=0)
    assert len(prompts) == 2
    assert all(p.messages and p.messages[-1].role == "user" for p in prompts)
