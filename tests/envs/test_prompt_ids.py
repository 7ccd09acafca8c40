"""Single-turn environments look a prompt up by its id, as the gate's spot checks need:
the prompt that comes back is the one `prompts` handed out; a forged id gives None."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from envs.arithmetic import ArithmeticConfig, ArithmeticEnv
from envs.base import Split
from envs.code_tests import CodeConfig, CodeEnv
from envs.copy_digits import CopyConfig, CopyEnv
from envs.math_problems import MathConfig, MathEnv
from envs.registry import make_env
from relay.config import RunConfig


def dataset_env(tmp_path: Path) -> object:
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": str(i)}) + "\n"
                            for i in range(60)))  # fmt: skip
    return make_env(RunConfig.model_validate({"env": {"type": "dataset", "path": str(rows)}}).env)


@pytest.mark.parametrize("name", ["arithmetic", "copy", "math", "code", "dataset"])
def test_every_prompt_is_found_by_its_id_and_forgeries_are_not(name: str, tmp_path: Path) -> None:
    env = {
        "arithmetic": lambda: ArithmeticEnv(ArithmeticConfig()),
        "copy": lambda: CopyEnv(CopyConfig()),
        "math": lambda: MathEnv(MathConfig()),
        "code": lambda: CodeEnv(CodeConfig()),
        "dataset": lambda: dataset_env(tmp_path),
    }[name]()
    for split in Split:
        for prompt in env.prompts(split, 3, seed=1):
            assert env.prompt_for_id(prompt.prompt_id) == prompt
    for forged in (f"{name}:", f"{name}:nope", "arithmetic:1/0=", "other:1+1=", "dataset:test:999"):
        assert env.prompt_for_id(forged) is None, forged
