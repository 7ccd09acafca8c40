"""Config loading, overrides, and errors that name the field."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

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


def test_another_env_type_on_the_command_line_leaves_the_files_env_keys_behind() -> None:
    # configs/demo.yaml's env holds arithmetic's digits and operators; another task given
    # on the command line starts from its own defaults, whatever the order of overrides.
    demo = Path(__file__).parents[2] / "configs" / "demo.yaml"
    config = load_config(demo, ["env.max_answer_chars=100", "env.type=math"], environ={})
    assert config.env.type == "math" and config.env.max_answer_chars == 100
    same = load_config(demo, ["env.type=arithmetic", "env.digits=3"], environ={})
    assert same.env.operators == ["+"] and same.env.digits == 3  # the same task: merged


def test_dump_reloads_to_the_same_config(tmp_path: Path) -> None:
    config = load_config(None, ["env.type=calculator", "eval.n_prompts=7"])
    assert load_config(write(tmp_path, dump_config(config))) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["warmstart.lr=-1"], "warmstart.lr: input should be greater than 0 (got -1)"),
        (
            ["warmstart.lrr=1"],
            "warmstart.lrr: unknown key; allowed: batch_size, check_every_steps, check_prompts,",
        ),
        (["env.type=chess"], "env: unknown env.type 'chess'; installed: arithmetic, math, code"),
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
        (
            ["buffer.key_prefix=run*1"],
            "buffer.key_prefix: value error, may hold only letters, digits",
        ),
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
        (["buffer.replay=0"], "buffer.replay: input should be greater than or equal to 1"),
        (["learner.cpu_cores=one"], "learner.cpu_cores: value error, 'one' is not a list of cores"),
        (
            ["buffer.replay=2", "buffer.max_staleness=0"],
            "buffer.replay=2 never replays with buffer.max_staleness=0: a group is a version "
            "staler at its next use",
        ),
        (
            ["buffer.replay=2", "mode=sync"],
            "buffer.replay=2 never replays with buffer.max_staleness=0: mode sync trains on-policy",
        ),
        (
            ["learner.loss.type=m2po", "learner.loss.tau=0"],
            "learner.loss.tau: input should be greater than 0 (got 0)",
        ),
        (
            ["learner.loss.type=seq_mis", "learner.loss.upper=0.5"],
            "learner.loss.upper: input should be greater than or equal to 1 (got 0.5)",
        ),
        # A rule within one section names the section, then its fields, without the input.
        (
            ["learner.minibatches=9"],
            "learner: minibatches=9 exceeds batch_groups=8: a minibatch holds whole groups",
        ),
        (
            ["actors.sampling.temperature=0"],
            "actors.sampling: temperature must be > 0 for rollouts",
        ),
        (["learner.lr=inf"], "learner.lr: input should be a finite number (got 'inf')"),
        (
            ["learner.loss.type=seq_is", "learner.loss.clip_high=nan"],
            "learner.loss.clip_high: input should be a finite number",
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
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("run_dir: runs/caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 17: invalid"):
        load_config(latin1)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(write(tmp_path, "seed: " + "[" * 20_000 + "]" * 20_000 + "\n"))


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


def test_several_files_merge_in_order(tmp_path: Path) -> None:
    base, mine = tmp_path / "base.yaml", tmp_path / "mine.yaml"
    base.write_text("seed: 1\nlearner:\n  lr: 0.001\n  steps: 5\nenv:\n  digits: 3\n")
    mine.write_text("learner:\n  lr: 0.002\nenv:\n  operators: ['-']\n")
    config = load_config([base, mine])
    # The later file wins key by key; sections it does not name keep the earlier values.
    assert (config.seed, config.learner.lr, config.learner.steps) == (1, 0.002, 5)
    assert (config.env.digits, config.env.operators) == (3, ["-"])
    assert load_config([mine, base]).learner.lr == 0.001


def test_environment_variables_set_fields_between_files_and_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "learner:\n  lr: 0.001\n")
    environ = {
        "RELAY_DASHBOARD__TOKEN": "0123",  # a token of digits stays a string
        "RELAY_LEARNER__LR": "5e-4",
        "RELAY_ACTORS__SAMPLING__MAX_TOKENS": "12",
        "RELAY_HOME": "/elsewhere",  # no double underscore: not config
    }
    config = load_config(path, [], environ)
    assert config.dashboard.token == "0123"
    assert config.learner.lr == 5e-4
    assert config.actors.sampling.max_tokens == 12
    assert load_config(path, ["learner.lr=0.01"], environ).learner.lr == 0.01
    with pytest.raises(ConfigError, match=r"learner\.lrr: unknown key"):
        load_config(None, [], {"RELAY_LEARNER__LRR": "1"})


def test_cli_takes_overrides_anywhere_and_several_files(tmp_path: Path) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text("learner:\n  steps: 7\n")
    result = relay_cli(
        "config", "show", "seed=3", "-c", "configs/demo.yaml", "eval.n_prompts=9",
        "-c", str(extra), "learner.lr=0.005",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["seed"] == 3 and shown["eval"]["n_prompts"] == 9
    assert shown["learner"]["steps"] == 7 and shown["learner"]["lr"] == 0.005
    assert shown["learner"]["batch_groups"] == 16  # from demo.yaml, kept by the merge
    bad = relay_cli("config", "show", "-c", "configs/demo.yaml", "seed=3", "--frobnicate")
    assert bad.returncode == 2 and "unrecognized arguments: --frobnicate" in bad.stderr


def test_dumped_configs_mask_secrets() -> None:
    config = load_config(
        None, [], {"RELAY_DASHBOARD__TOKEN": "t0k3n", "RELAY_BUFFER__URL": "redis://:pw@h:6379/0"}
    )
    dumped = yaml.safe_load(dump_config(config))
    assert dumped["dashboard"]["token"] == "***"
    assert dumped["buffer"]["url"] == "redis://:***@h:6379/0"
    assert "t0k3n" not in dump_config(config) and "pw@" not in dump_config(config)
    assert "t0k3n" in dump_config(config, redact=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_nccl_transport_without_a_gpu_is_one_error_naming_the_field() -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, ["actors.transport=nccl"])
    message = str(error.value)
    assert "actors.transport" in message and "no CUDA device" in message
    assert message.count("\n") <= 1
    assert load_config(None, ["actors.weight_dtype=bfloat16"]).actors.weight_dtype == "bfloat16"


def test_checkpoints_too_rare_for_the_buffer_are_one_error() -> None:
    # 400 steps x 16 groups wait for their checkpoint in a buffer of 4,096 groups.
    with pytest.raises(ConfigError) as error:
        load_config(REPO / "configs" / "demo.yaml", ["learner.checkpoint.every_steps=400"])
    assert "learner.checkpoint.every_steps=400" in str(error.value)
    assert "buffer.capacity_groups=4096" in str(error.value)
