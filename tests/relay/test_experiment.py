"""`join_experiment` trusts nothing it reads from Redis (real redis-server)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from buffer.weights import RedisWeightStore
from relay.config import load_config
from relay.errors import RelayError
from relay.experiment import join_experiment, publish_experiment


@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute", "sub/dir", "..", "a\\b", "x\0y"])
def test_a_model_file_name_that_leaves_the_cache_is_refused(
    redis_server, tmp_path: Path, warm_model_dir: Path, name: str
) -> None:
    prefix = f"test:join:{abs(hash(name))}"
    config = load_config(None, [f"model.path={warm_model_dir}", f"buffer.key_prefix={prefix}"])
    client = redis_server.client()
    publish_experiment(client, config, run_id="run")
    RedisWeightStore(client, prefix).publish(1, {"w": torch.zeros(1)})
    client.hset(f"{prefix}:experiment:files", name, b"written by whoever can write to Redis")
    cache = tmp_path / "cache"
    with pytest.raises(RelayError, match="not a plain file name; nothing was written"):
        join_experiment(client, prefix, [], cache, timeout_s=5)
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/absolute").exists()
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))
