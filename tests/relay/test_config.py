"""Config loading, overrides, and errors that name the field."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import RunConfig, apply_override, dump_config, load_config
from relay.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_validate() -> None:
    config = load_config(None)
    assert config == RunConfig()
    assert config.env.type == "arithmetic"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_validate(name: str) -> None:
    load_config(REPO / "configs" / name)


def test_overrides_are_typed_and_nested(tmp_path: Path) -> None:
    path = write(tmp_path, "warmstart:\n  lr: 0.001\n")
    config = load_config(
        path, ["warmstart.lr=3e-4", "env.digits=3", "env.operators=[+, '-']", "seed=5"]
    )
    assert config.warmstart.lr == 3e-4
    assert config.env.digits == 3
    assert config.env.operators == ["+", "-"]
    assert config.seed == 5


def test_override_switches_the_env_type() -> None:
    config = load_config(None, ["env.type=math", "env.max_answer_chars=100"])
    assert config.env.type == "math"
    assert config.env.max_answer_chars == 100


def test_dump_reloads_to_the_same_config(tmp_path: Path) -> None:
    config = load_config(None, ["env.type=calculator", "eval.n_prompts=7"])
    assert load_config(write(tmp_path, dump_config(config))) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["warmstart.lr=-1"], "warmstart.lr: input should be greater than 0 (got -1)"),
        (["warmstart.lrr=1"], "warmstart.lrr: unknown key; allowed: batch_size, lr,"),
        (["env.type=chess"], "env: input tag 'chess'"),
        (["env.digits=many"], "env.digits: input should be a valid integer"),
        (["env.type=math", "env.digits=2"], "env.digits: unknown key; allowed: max_answer_chars"),
        (["env.operators=[/]"], "env.operators.0: input should be '+', '-' or '*'"),
        (["engine.dtype=int8"], "engine.dtype: input should be 'float32'"),
        (["bogus=1"], "bogus: unknown key; allowed: actors, buffer, dashboard, engine, env"),
        (["dashboard.port=70000"], "dashboard.port: input should be less than or equal to 65535"),
        # A rule across fields reads as one sentence naming them, not as "(top level)".
        (
            ["ray.learner_resources={learning: 1}"],
            "ray.learner_resources / ray.learner_num_gpus place the learner on a node of a "
            "running cluster: set ray.address",
        ),
        (["buffer.overflow=spill"], "buffer.overflow: input should be 'block' or 'drop_oldest'"),
        (
            ["buffer.max_staleness=-1"],
            "buffer.max_staleness: input should be greater than or equal to 0",
        ),
        (["buffer.key_prefix=run*1"], "buffer.key_prefix: value error, must not contain '*'"),
        (
            ["learner.update_epochs=0"],
            "learner.update_epochs: input should be greater than or equal to 1 (got 0)",
        ),
        (["learner.time_limit_s=0"], "learner.time_limit_s: input should be greater than 0"),
        (
            ["learner.snapshot_every_steps=-5"],
            "learner.snapshot_every_steps: input should be greater than or equal to 0",
        ),
        (["learner.lr_schedule=step"], "learner.lr_schedule: input should be 'constant'"),
        (["actors.cpu_cores=3"], "actors.cpu_cores: input should be a valid list"),
        # A rule within one section names the section, then its fields, without the input.
        (
            ["learner.minibatches=9"],
            "learner: minibatches=9 exceeds batch_groups=8: a minibatch holds whole groups",
        ),
        (
            ["actors.sampling.temperature=0"],
            "actors.sampling: temperature must be > 0 for rollouts",
        ),
        (["seed"], "override 'seed' must look like section.key=value"),
        (["seed=1", "seed.x=2"], "seed is not a section"),
    ],
)
def test_errors_name_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match=r"run.yaml:2: not valid YAML"):
        load_config(write(tmp_path, "seed: 1\nenv: type: math\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_apply_override_creates_sections() -> None:
    raw: dict = {}
    apply_override(raw, "a.b.c=[1, 2]")
    assert raw == {"a": {"b": {"c": [1, 2]}}}


def relay_cli(*args: str) -> subprocess.CompletedProcess[str]:
    relay = shutil.which("relay", path=str(Path(sys.executable).parent))
    return subprocess.run([relay, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_cli_reports_a_bad_value_in_one_line_with_exit_code_2() -> None:
    result = relay_cli("config", "show", "-c", "configs/demo.yaml", "warmstart.lr=-1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "config error: warmstart.lr: input should be greater than 0 (got -1)"
    ]
    assert "Traceback" not in result.stderr


def test_cli_shows_the_resolved_config() -> None:
    result = relay_cli("config", "show", "-c", "configs/demo.yaml", "eval.n_prompts=9")
    assert result.returncode == 0, result.stderr
    assert "n_prompts: 9" in result.stdout
    assert "type: arithmetic" in result.stdout
