"""The run configuration: each component's pydantic model composed into `RunConfig`.

Loaded from YAML, overridden with dotted `key=value` arguments, validated once before
anything starts. Any mistake becomes a `ConfigError` whose message names the field and
what is allowed, e.g. `warmstart.lr: must be greater than 0 (got -1)`.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from actors.config import ActorConfig, EngineConfig, EvalConfig
from buffer.config import BufferConfig, RedisServerConfig
from envs.arithmetic import ArithmeticConfig
from envs.registry import EnvConfig, PluginConfigError
from learner.config import LearnerConfig
from relay.config_models import TinyModelConfig, WarmstartConfig
from relay.dashboard.config import DashboardConfig
from relay.errors import ConfigError


class ModelConfig(BaseModel):
    """The policy: where it is loaded from, and the shape used when Relay builds one."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: str = "models/tiny"
    """A Hugging Face model directory, or a hub id (`org/name`) downloaded once at start
    (into the Hugging Face cache) for vLLM, the learner and evaluation alike."""
    tokenizer_path: str | None = None
    """Take the tokenizer from this directory or hub id instead of `path`."""
    chat_template: str | None = None
    """A Jinja chat template, or the path of a file holding one, instead of the
    tokenizer's own (prompts are rendered with it, and the exported policy keeps it)."""
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    """Shape of the model `relay model init` builds at `path` (no download needed)."""


class RayConfig(BaseModel):
    """Where `relay run` finds or starts Ray."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    address: str | None = None
    """A running cluster ("auto" inside `ray job submit` / `ray submit`, or host:port);
    None starts a local Ray for the run and stops it at the end."""
    num_cpus: int | None = Field(None, gt=0)
    """CPUs of the local Ray (None: all of this machine's)."""
    learner_resources: dict[str, float] = Field(default_factory=dict)
    """In a cluster: custom resources of the node the learner must run on, e.g.
    {learning: 1} on deploy/ray's learner node type. `relay run` then moves itself (driver,
    learner and evaluations) onto such a node as a Ray actor; empty: it runs where it was
    started (the head, under `ray submit` and `ray job submit`)."""
    learner_num_gpus: float = Field(0, ge=0)
    """GPUs that actor reserves (learner.world_size on a GPU node; vLLM evaluation shares them)."""
    learner_wait_s: float = Field(900.0, gt=0)
    """How long to wait for such a node (the autoscaler may have to start one)."""


class WandbConfig(BaseModel):
    """A Weights & Biases run that receives the learner's metrics."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    project: str = "relay"
    entity: str | None = None
    name: str | None = None
    """The run's display name (None: run_dir's name)."""
    tags: list[str] = Field(default_factory=list)
    mode: Literal["offline", "online"] = "offline"
    """offline needs no network or account; `wandb sync run_dir/wandb/offline-run-*`
    uploads it later. online needs WANDB_API_KEY in the environment."""


class LoggingConfig(BaseModel):
    """What the terminal shows and where everything else is written."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    quiet: bool = True
    """`relay run`, `learn`, `actor` and `eval` show only Relay's progress and log lines
    on the terminal; vLLM, Ray, DeepSpeed and other libraries write to `file`. False: all
    of it on the terminal."""
    file: Path = Path("relay.log")
    """The log file, relative to run_dir (or absolute)."""
    wandb: WandbConfig | None = None
    """Also log the learner's metrics to W&B (None: not at all); `logging.wandb: {}` for
    an offline run with the defaults."""
    tensorboard: bool = False
    """Also write the learner's metrics as TensorBoard event files in run_dir/tensorboard."""


class RunConfig(BaseModel):
    """Everything a Relay command needs, validated before it starts."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    run_dir: Path = Path("runs/default")
    """Where logs, metrics and results of this run are written."""
    mode: Literal["async", "sync"] = "async"
    """async: actors and learner never wait for each other (staleness bounded by the
    buffer). sync: the on-policy baseline on the same code and resources, obtained by
    scheduling alone: buffer.max_staleness 0 with admission control (actors start only the
    groups of the current version), actors drain before loading new weights."""
    seed: int = 0
    """Seeds prompts, sampling and initialisation."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    env: EnvConfig = Field(default_factory=ArithmeticConfig)
    """The task; `type` selects it (arithmetic, math, code, calculator, reasoning_gym,
    dataset, copy, or a plugin by entry point or `package.module:Class`:
    docs/environments.md)."""
    engine: EngineConfig = Field(default_factory=EngineConfig)
    """vLLM engine settings (actors and evaluation)."""
    actors: ActorConfig = Field(default_factory=ActorConfig)
    """Rollout actors: how many, group size, sampling, how they follow new weights."""
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    """The Redis replay buffer between actors and learner."""
    redis: RedisServerConfig = Field(default_factory=RedisServerConfig)
    """The embedded redis-server, used when buffer.url is not set."""
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    """The DeepSpeed learner: objective, batch, schedule, checkpoints."""
    ray: RayConfig = Field(default_factory=RayConfig)
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig)
    """The live dashboard and Prometheus endpoint `relay run` serves."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """The terminal and the run's log file."""
    _notes: list[str] = PrivateAttr(default_factory=list)
    """Adjustments validation made (e.g. by mode sync), for the driver to log."""

    @property
    def notes(self) -> list[str]:
        return list(self._notes)

    warmstart: WarmstartConfig = Field(default_factory=WarmstartConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _synchronous_schedule(self) -> RunConfig:
        if self.mode == "sync":
            clashes = [
                f"{section}.{name}={getattr(part, name)!r}"
                for section, part, name, value in (
                    ("buffer", self.buffer, "max_staleness", 0),
                    ("buffer", self.buffer, "admission_control", True),
                    ("actors", self.actors, "weight_updates", "drain"),
                )
                if name in part.model_fields_set and getattr(part, name) != value
            ]
            if clashes:
                self._notes.append(f"mode sync overrides {', '.join(clashes)}")
            self.buffer.max_staleness = 0
            self.buffer.admission_control = True
            self.actors.weight_updates = "drain"
        return self

    @model_validator(mode="after")
    def _replays_need_staleness_room(self) -> RunConfig:
        # Runs after the sync schedule: mode sync sets max_staleness 0.
        replay, buffer = self.buffer.replay, self.buffer
        if replay > 1 and buffer.max_staleness == 0 and self.learner.push_every_steps == 1:
            reason = "mode sync trains on-policy, " if self.mode == "sync" else ""
            raise ValueError(
                f"buffer.replay={replay} never replays with buffer.max_staleness=0: "
                f"{reason}a group is a version staler at its next use (the learner publishes "
                "every step); raise buffer.max_staleness or learner.push_every_steps"
            )
        return self

    @model_validator(mode="after")
    def _uncommitted_groups_fit_the_buffer(self) -> RunConfig:
        # Trained groups stay in the buffer until the checkpoint that holds their update
        # is saved (exactly-once); if they alone fill it, actors block and the run stalls.
        learner, capacity = self.learner, self.buffer.capacity_groups
        waiting = learner.checkpoint.every_steps * learner.batch_groups * learner.world_size
        if waiting >= capacity:
            raise ValueError(
                f"learner.checkpoint.every_steps={learner.checkpoint.every_steps} keeps "
                f"{waiting} trained groups in the buffer until each checkpoint, and "
                f"buffer.capacity_groups={capacity} would be full before it: the run would "
                "stall. Checkpoint more often, or raise buffer.capacity_groups"
            )
        return self

    @model_validator(mode="after")
    def _placement_needs_a_cluster(self) -> RunConfig:
        if (self.ray.learner_resources or self.ray.learner_num_gpus) and self.ray.address is None:
            raise ValueError(
                "ray.learner_resources / ray.learner_num_gpus place the learner on a node of a "
                "running cluster: set ray.address (auto inside ray submit / ray job submit)"
            )
        return self

    @model_validator(mode="after")
    def _derive_groups_per_version(self) -> RunConfig:
        # Admission control lets actors run (max_staleness + 1) versions ahead; a version
        # is what the learner consumes between pushes. Derived unless set explicitly.
        if "groups_per_version" not in self.buffer.model_fields_set:
            learner = self.learner
            self.buffer.groups_per_version = (
                learner.batch_groups * learner.world_size * learner.push_every_steps
            )
        return self

    @field_validator("env", mode="before")
    @classmethod
    def _default_env_type(cls, value: Any) -> Any:
        # `env.digits=3` alone should tune the default task, not fail on a missing tag.
        if isinstance(value, dict) and "type" not in value:
            return {"type": ArithmeticConfig().type, **value}
        return value


ENV_PREFIX = "RELAY_"
"""`RELAY_<SECTION>__<KEY>=value` sets section.key (secrets stay off the command line and
out of config files: RELAY_DASHBOARD__TOKEN, RELAY_BUFFER__URL). Names without a double
underscore (RELAY_HOME, RELAY_CONFIG in deploy scripts) are not config."""


def load_config(
    paths: Path | Sequence[Path] | None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> RunConfig:
    """Read the YAML files in order (a later file's keys win, sections merge), then
    `RELAY_<SECTION>__<KEY>` environment variables, then `key=value` overrides; validate."""
    if paths is None:
        paths = []
    elif isinstance(paths, Path):
        paths = [paths]
    raw: dict[str, Any] = {}
    for path in paths:
        merge(raw, _read_yaml(path))
    for key, value in environment_overrides(os.environ if environ is None else environ):
        set_key(raw, key, value)
    types = [o.partition("=")[2].strip() for o in overrides if o.partition("=")[0] == "env.type"]
    env = raw.get("env")
    if types and isinstance(env, dict) and str(env.get("type")) != types[-1]:
        raw["env"] = {}  # another task on the command line: the files' env keys are not its
    for override in overrides:
        apply_override(raw, override)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, RunConfig)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return loaded or {}


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `update` into `base`: mappings key by key, anything else (lists too) replaced."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def environment_overrides(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """`RELAY_A__B=v` -> ("a.b", "v"), in name order. Values stay strings (a token of
    digits is still a token); validation converts numbers and booleans where declared."""
    return [
        (name[len(ENV_PREFIX) :].lower().replace("__", "."), value)
        for name, value in sorted(environ.items())
        if name.startswith(ENV_PREFIX) and "__" in name[len(ENV_PREFIX) :]
    ]


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in the nested dict `raw`; the value is parsed as YAML."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    set_key(raw, key, value, what=f"override {override!r}")


def set_key(raw: dict[str, Any], key: str, value: Any, what: str | None = None) -> None:
    """Set the dotted `key` in the nested dict `raw`, creating sections as needed."""
    parts = key.split(".")
    if any(not part for part in parts):
        raise ConfigError(f"{what or repr(key)} must look like section.key=value")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def describe_validation_error(error: ValidationError, model: type[BaseModel]) -> str:
    """One clause per problem, each naming the dotted field and what is allowed."""
    return "; ".join(_clauses(error, model))


def _clauses(error: ValidationError, model: type[BaseModel]) -> list[str]:
    clauses = []
    for problem in error.errors(include_url=False):
        names, node = _resolve(model, [str(part) for part in problem["loc"]])
        field = ".".join(names) or "(top level)"
        if problem["type"] == "extra_forbidden":
            names, node = _resolve(model, [str(part) for part in problem["loc"][:-1]])
            allowed = _field_names(node)
            message = "unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
        elif problem["type"] == "value_error" and not names:
            # A rule across fields (a model validator): its message names the fields.
            clauses.append(str(problem["ctx"]["error"]))
            continue
        elif isinstance(cause := problem.get("ctx", {}).get("error"), PluginConfigError):
            # A plugin environment's own config: its clauses, under this section's name.
            clauses.extend(f"{field}.{c}" for c in _clauses(cause.error, cause.config_class))
            continue
        elif problem["type"] == "value_error" and isinstance(problem["input"], dict):
            # A rule of one section: its message names the section's fields.
            message = str(problem["ctx"]["error"])
        else:
            message = _lowercase_first(problem["msg"])
            if problem["type"] not in ("missing", "union_tag_invalid"):
                message += f" (got {problem['input']!r})"
        clauses.append(f"{field}: {message}")
    return clauses


def _resolve(model: type[BaseModel], location: list[str]) -> tuple[list[str], Any]:
    """Follow pydantic's error location through the models.

    Returns the user-facing dotted names (a discriminated union adds its tag to
    pydantic's location, which the user never wrote) and the type found there.
    """
    names: list[str] = []
    node: Any = model
    for part in location:
        tagged = _member_tags(node).get(part)
        if tagged is not None:
            node = tagged
            continue
        names.append(part)
        fields = getattr(node, "model_fields", None)
        node = _unwrap(fields[part].annotation) if fields and part in fields else None
    return names, node


def _field_names(node: Any) -> list[str]:
    if hasattr(node, "model_fields"):
        return sorted(node.model_fields)
    return sorted({name for member in _union_members(node) for name in member.model_fields})


def _union_members(node: Any) -> list[Any]:
    members = (_unwrap(m) for m in getattr(node, "__args__", ()))
    return [m for m in members if hasattr(m, "model_fields")]


def _member_tags(node: Any) -> dict[str, Any]:
    """tag -> model of a tagged union: a `Tag` annotation, else the model's `type` default."""
    tags = {}
    for member in getattr(node, "__args__", ()):
        model = _unwrap(member)
        if not hasattr(model, "model_fields"):
            continue
        marks = [m.tag for m in getattr(member, "__metadata__", ()) if isinstance(m, Tag)]
        tag = marks[0] if marks else _tag(model)
        if tag is not None:
            tags[tag] = model
    return tags


def _unwrap(annotation: Any) -> Any:
    # Annotated[Union[...], Field(discriminator=...)] -> Union[...]
    return annotation.__origin__ if hasattr(annotation, "__metadata__") else annotation


def _tag(model: Any) -> str | None:
    field = getattr(model, "model_fields", {}).get("type")
    return field.default if field is not None else None


def _lowercase_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def dump_config(config: RunConfig, redact: bool = True) -> str:
    """The resolved config as YAML, in the order fields are declared; the dashboard token
    and the buffer URL's password are masked unless `redact` is False."""
    raw = config.model_dump(mode="json")
    if redact:
        if raw["dashboard"].get("token"):
            raw["dashboard"]["token"] = REDACTED
        if raw["buffer"].get("url"):
            raw["buffer"]["url"] = _PASSWORD.sub(rf"\1{REDACTED}@", raw["buffer"]["url"])
    return yaml.safe_dump(raw, sort_keys=False)


REDACTED = "***"
_PASSWORD = re.compile(r"^(\w+://[^:@/]*:)[^@/]+@")
