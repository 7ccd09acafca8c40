"""Environment plugins: a package built and installed here, found by entry point or path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from envs.base import Environment, Message, Split
from envs.registry import ENVIRONMENTS

PACKAGE = '''
from pydantic import BaseModel, ConfigDict, Field

from envs.base import Message, Prompt, SingleTurnEnvironment, Split, Verdict


class EchoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    size: int = Field(2, gt=0)


class EchoEnv(SingleTurnEnvironment):
    """Repeat a number: prompts `say N`, the reply must be N."""

    name = "echo"
    config_class = EchoConfig

    def __init__(self, config: EchoConfig) -> None:
        self.config = config

    def prompts(self, split: Split, count: int, seed: int) -> list[Prompt]:
        base = 0 if split is Split.TRAIN else 10**self.config.size
        return [
            Prompt(f"echo-{base + seed + i}", (Message("user", f"say {base + seed + i}"),),
                   str(base + seed + i))
            for i in range(count)
        ]

    def score(self, prompt: Prompt, response: str) -> Verdict:
        correct = response.strip() == prompt.reference
        return Verdict(reward=float(correct), correct=correct)
'''

PYPROJECT = """
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "relay-echo-env"
version = "0.1"

[project.entry-points."relay.envs"]
echo = "relay_echo_env:EchoEnv"

[tool.setuptools]
packages = ["relay_echo_env"]
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin package, built and installed into a directory of its own."""
    source = tmp_path_factory.mktemp("echo-src")
    (source / "relay_echo_env").mkdir()
    (source / "relay_echo_env" / "__init__.py").write_text(textwrap.dedent(PACKAGE))
    (source / "pyproject.toml").write_text(PYPROJECT)
    target = tmp_path_factory.mktemp("echo-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    assert (target / "relay_echo_env" / "__init__.py").is_file()
    return target


def relay(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("relay", path=str(Path(sys.executable).parent))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    return subprocess.run([executable, *args], capture_output=True, text=True, env=env, timeout=120)


def test_an_installed_plugin_is_found_by_its_entry_point(site: Path) -> None:
    shown = relay(site, "config", "show", "env.type=echo", "env.size=3")
    assert shown.returncode == 0, shown.stderr
    env = yaml.safe_load(shown.stdout)["env"]
    assert env == {"type": "echo", "size": 3}  # dumped flat, as the user writes it

    # The plugin's own config is validated, and its errors name the field.
    bad = relay(site, "config", "show", "env.type=echo", "env.size=0")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "config error: env.size: input should be greater than 0 (got 0)"
    extra = relay(site, "config", "show", "env.type=echo", "env.digits=2")
    assert extra.stderr.strip() == "config error: env.digits: unknown key; allowed: size"

    # An unknown type lists what is installed, the plugin included.
    unknown = relay(site, "config", "show", "env.type=chess")
    assert unknown.returncode == 2
    installed = ", ".join([*ENVIRONMENTS, "echo"])
    assert f"unknown env.type 'chess'; installed: {installed}" in unknown.stderr


def test_a_plugin_by_import_path_builds_and_round_trips(
    site: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from envs.registry import make_env
    from relay.config import dump_config, load_config

    monkeypatch.syspath_prepend(str(site))
    for type_name in ("relay_echo_env:EchoEnv", "echo"):
        config = load_config(None, [f"env.type={type_name}", "env.size=1"], environ={})
        env = make_env(config.env)
        assert isinstance(env, Environment) and env.name == "echo"
        (prompt,) = env.prompts(Split.TEST, 1, seed=4)
        assert prompt.messages[-1].content == "say 14"
        assert env.verify(prompt, [Message("assistant", "14")]).correct
        assert not env.verify(prompt, [Message("assistant", "15")]).correct
        path = tmp_path / "dumped.yaml"
        path.write_text(dump_config(config))
        assert load_config(path, environ={}) == config

    missing = "relay_echo_env:NoSuchEnv"
    with pytest.raises(Exception, match="cannot import it"):
        load_config(None, [f"env.type={missing}"], environ={})


def test_a_config_from_the_buffer_imports_only_allowed_plugin_paths(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A joining actor reads its config from Redis; whoever can write there must not pick
    # the module it imports.
    from pydantic import ValidationError

    from envs.registry import ALLOWED_PLUGINS
    from relay.config import RunConfig

    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "relay_echo_env", raising=False)
    raw = {"env": {"type": "relay_echo_env:EchoEnv", "size": 1}}
    with pytest.raises(ValidationError, match="--allow-plugin relay_echo_env:EchoEnv"):
        RunConfig.model_validate(raw, context={ALLOWED_PLUGINS: set()})
    assert "relay_echo_env" not in sys.modules
    allowed = {ALLOWED_PLUGINS: {"relay_echo_env:EchoEnv"}}
    assert RunConfig.model_validate(raw, context=allowed).env.type == "relay_echo_env:EchoEnv"
    # Entry points are the actor host's own installs: allowed without naming them.
    assert RunConfig.model_validate({"env": {"type": "echo"}}, context={ALLOWED_PLUGINS: set()})
