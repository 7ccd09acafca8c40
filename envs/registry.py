"""Environment configs as one discriminated union, and `make_env` to build one by `type`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from envs.arithmetic import ArithmeticConfig, ArithmeticEnv
from envs.base import Environment
from envs.calculator import CalculatorConfig, CalculatorEnv
from envs.code_tests import CodeConfig, CodeEnv
from envs.math_problems import MathConfig, MathEnv

EnvConfig = Annotated[
    ArithmeticConfig | MathConfig | CodeConfig | CalculatorConfig, Field(discriminator="type")
]

ENVIRONMENTS = {
    "arithmetic": ArithmeticEnv,
    "math": MathEnv,
    "code": CodeEnv,
    "calculator": CalculatorEnv,
}


def make_env(config: EnvConfig) -> Environment:
    """Build the environment that `config.type` names."""
    return ENVIRONMENTS[config.type](config)
