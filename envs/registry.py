"""Environments by `type`: the built-in ones, and plugins found by entry point or import path.

A plugin is a class that implements `envs.base.Environment`, takes its config in
`__init__`, and names that config's pydantic model in `config_class`. It is found by
`env.type`, either as the name of an entry point in the `relay.envs` group (a package
declares `[project.entry-points."relay.envs"] countdown = "mypkg.envs:Countdown"`) or as
an import path `package.module:Class`.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Tag,
    ValidationError,
    ValidationInfo,
    model_serializer,
    model_validator,
)

from envs.arithmetic import ArithmeticConfig, ArithmeticEnv
from envs.base import EnvError, Environment, import_object
from envs.calculator import CalculatorConfig, CalculatorEnv
from envs.code_tests import CodeConfig, CodeEnv
from envs.copy_digits import CopyConfig, CopyEnv
from envs.dataset_env import DatasetConfig, DatasetEnv
from envs.math_problems import MathConfig, MathEnv
from envs.reasoning_gym_env import ReasoningGymConfig, ReasoningGymEnv

ENTRY_POINT_GROUP = "relay.envs"
ALLOWED_PLUGINS = "allowed_plugins"
"""Validation context key: the import paths a config from elsewhere may name (a set)."""

ENVIRONMENTS = {
    "arithmetic": ArithmeticEnv,
    "math": MathEnv,
    "code": CodeEnv,
    "calculator": CalculatorEnv,
    "reasoning_gym": ReasoningGymEnv,
    "dataset": DatasetEnv,
    "copy": CopyEnv,
}


class PluginConfigError(EnvError):
    """A plugin's own config did not validate; `error` names its fields."""

    def __init__(self, error: ValidationError, config_class: type[BaseModel]) -> None:
        super().__init__(str(error))
        self.error, self.config_class = error, config_class


class PluginEnvConfig(BaseModel):
    """`env:` for a plugin: its `type`, and its own config validated by its config_class.
    Written (and dumped) flat, as `type` beside the plugin's own keys."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, allow_inf_nan=False)

    type: str
    settings: BaseModel

    @model_validator(mode="before")
    @classmethod
    def _validate_with_the_plugin(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, dict) or "settings" in value:
            return value
        type_name = str(value.get("type"))
        allowed = (info.context or {}).get(ALLOWED_PLUGINS)
        if allowed is not None and ":" in type_name and type_name not in allowed:
            # A config read back from Redis: whoever can write there must not choose
            # which module this process imports.
            raise EnvError(
                f"env.type {type_name!r} is an import path from the experiment's buffer; "
                f"import it only if you trust it: --allow-plugin {type_name}"
            )
        config_class = plugin_class(type_name).config_class
        own = {k: v for k, v in value.items() if k != "type"}
        try:
            return {"type": value["type"], "settings": config_class.model_validate(own)}
        except ValidationError as error:
            raise PluginConfigError(error, config_class) from None

    @model_serializer(mode="plain")
    def _flat(self) -> dict[str, Any]:
        own = self.settings.model_dump(mode="json")
        own.pop("type", None)  # a plugin's config may declare a type of its own
        return {"type": self.type, **own}


def _env_tag(value: Any) -> str:
    tag = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return tag if tag in ENVIRONMENTS else "plugin"


EnvConfig = Annotated[
    Annotated[ArithmeticConfig, Tag("arithmetic")]
    | Annotated[MathConfig, Tag("math")]
    | Annotated[CodeConfig, Tag("code")]
    | Annotated[CalculatorConfig, Tag("calculator")]
    | Annotated[ReasoningGymConfig, Tag("reasoning_gym")]
    | Annotated[DatasetConfig, Tag("dataset")]
    | Annotated[CopyConfig, Tag("copy")]
    | Annotated[PluginEnvConfig, Tag("plugin")],
    Discriminator(_env_tag),
]
"""The `env:` section: a built-in task by its `type`, or a plugin."""


def installed_env_types() -> list[str]:
    """Built-in types, then the `relay.envs` entry points installed here."""
    plugins = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)} - set(ENVIRONMENTS))
    return [*ENVIRONMENTS, *plugins]


def plugin_class(type_name: str) -> type:
    """The environment class that a plugin `type` names; EnvError listing what is installed."""
    if ":" in type_name:
        found: Any = import_object(type_name, "env.type")
    else:
        matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == type_name]
        if not matches:
            raise EnvError(
                f"unknown env.type {type_name!r}; installed: {', '.join(installed_env_types())} "
                "(or an import path package.module:Class)"
            )
        found = matches[0].load()
    config_class = getattr(found, "config_class", None)
    if not (isinstance(config_class, type) and issubclass(config_class, BaseModel)):
        raise EnvError(
            f"env.type {type_name!r}: {getattr(found, '__name__', found)} has no config_class "
            "(the pydantic model of its config)"
        )
    return found


def make_env(config: BaseModel) -> Environment:
    """Build the environment that `config.type` names (a plugin's config carries its class)."""
    if config.type in ENVIRONMENTS:
        return ENVIRONMENTS[config.type](config)
    return plugin_class(config.type)(config.settings)
