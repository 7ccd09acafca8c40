"""Every registered environment satisfies the protocol and is built from its config."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import TypeAdapter

from envs.base import Environment, Split
from envs.registry import ENVIRONMENTS, EnvConfig, make_env


@pytest.mark.parametrize("name", sorted(ENVIRONMENTS))
def test_make_env_builds_each_type(name: str, tmp_path: Path) -> None:
    settings: dict = {"type": name}
    if name == "dataset":  # the one task with no default data: it reads the user's file
        rows = tmp_path / "rows.jsonl"
        rows.write_text("".join(f'{{"prompt": "{i}+1=", "answer": "{i + 1}"}}\n' for i in range(9)))
        settings.update(path=str(rows), test_path=str(rows))
    env = make_env(TypeAdapter(EnvConfig).validate_python(settings))
    assert isinstance(env, Environment)
    assert env.name == name
    prompts = env.prompts(Split.TEST, 2, seed=0)
    assert len(prompts) == 2
    assert all(p.messages and p.messages[-1].role == "user" for p in prompts)
