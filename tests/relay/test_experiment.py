"""`join_experiment` trusts nothing it reads from Redis (real redis-server)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from relay.config import load_config
from relay.errors import RelayError
from relay.experiment import join_experiment, publish_experiment
from weights.redis_store import RedisWeightStore


@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute", "sub/dir", "..", "a\\b", "x\0y"])
def test_a_model_file_name_that_leaves_the_cache_is_refused(
    redis_server, tmp_path: Path, warm_model_dir: Path, name: str
) -> None:
    prefix = f"test:join:{abs(hash(name))}"
    config = load_config(None, [f"model.path={warm_model_dir}", f"buffer.key_prefix={prefix}"])
    client = redis_server.client()
    publish_experiment(client, config, run_id="run")
    RedisWeightStore(client, prefix).publish_state(1, {"w": torch.zeros(1)})
    client.hset(f"{prefix}:experiment:files", name, b"written by whoever can write to Redis")
    cache = tmp_path / "cache"
    with pytest.raises(RelayError, match="not a plain file name; nothing was written"):
        join_experiment(client, prefix, [], cache, timeout_s=5)
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/absolute").exists()
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))


def test_the_experiment_record_holds_no_secret(redis_server, warm_model_dir: Path) -> None:
    prefix = "test:join:secrets"
    config = load_config(None, [
        f"model.path={warm_model_dir}", f"buffer.key_prefix={prefix}",
        "buffer.url=redis://:hunter2@10.0.0.1:6379/0", "dashboard.token=s3cret-token",
    ])  # fmt: skip
    client = redis_server.client()
    publish_experiment(client, config, run_id="run")
    stored = b"".join(client.hgetall(f"{prefix}:experiment").values())
    assert b"hunter2" not in stored and b"s3cret-token" not in stored
    RedisWeightStore(client, prefix).publish_state(1, {"w": torch.zeros(1)})
    joined, run_id, _ = join_experiment(client, prefix, [], redis_server.data_dir / "c", 5)
    assert run_id == "run" and joined.buffer.key_prefix == prefix
