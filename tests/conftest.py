"""Shared fixtures: the tiny model and one vLLM engine per test session."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from buffer.config import BufferConfig, RedisServerConfig
from buffer.replay_buffer import ReplayBuffer
from buffer.server import RedisServer
from relay.tiny_model import TinyModelConfig, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly built (untrained) tiny Qwen2 policy in Hugging Face format."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", TinyModelConfig(seed=0))


@pytest.fixture(scope="session")
def warm_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after a short warm start: it answers in digits and ends its turns."""
    from envs.arithmetic import ArithmeticConfig, ArithmeticEnv
    from relay.warmstart import WarmstartConfig, warmstart

    out = tmp_path_factory.mktemp("models") / "tiny-warm"
    config = WarmstartConfig(steps=150, batch_size=32, lr=2e-3, n_examples=2000, out_path=out)
    return warmstart(
        str(tiny_model_dir), ArithmeticEnv(ArithmeticConfig()), config, seed=0
    ).out_path


@pytest.fixture(scope="session")
def vllm_engine(warm_model_dir: Path) -> Iterator[object]:
    """One real vLLM engine (CPU build here) on the warm model, shared by the session."""
    from actors.engine import EngineConfig, build_llm

    llm = build_llm(warm_model_dir, EngineConfig(max_model_len=128, kvcache_gib=1), seed=0)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server (AOF on, password) for the session; tests use their own keys."""
    with RedisServer(tmp_path_factory.mktemp("redis"), RedisServerConfig()) as server:
        yield server


@pytest.fixture
def make_buffer(redis_server: RedisServer, request: pytest.FixtureRequest) -> object:
    """Build a ReplayBuffer on the session's Redis under a key prefix of this test's own."""
    counter = iter(range(1_000_000))

    def make(**config: object) -> ReplayBuffer:
        name = re.sub(r"[^A-Za-z0-9_.:-]", "_", request.node.name)
        prefix = f"test:{name}:{next(counter)}"
        return ReplayBuffer(redis_server.client(), BufferConfig(key_prefix=prefix, **config))

    return make


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """Leave the root logger as each test found it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
