"""An experiment's description in its buffer, so that actors can join with only the URL.

The learner writes the run config and the policy's small files (config, tokenizer) next
to the buffer; `relay actor --buffer redis://...` reads them, writes a local model
directory with the latest published weights, and starts generating for that experiment.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import redis
from pydantic import ValidationError

from buffer.keys import Keyspace
from buffer.polling import poll
from buffer.telemetry import Telemetry
from envs.registry import ALLOWED_PLUGINS
from relay.config import RunConfig, apply_override, describe_validation_error
from relay.errors import ConfigError, RelayError
from weights.redis_store import RedisWeightStore

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def publish_experiment(client: redis.Redis, config: RunConfig, run_id: str) -> None:
    """Write the run config and the policy's non-weight files under the buffer's prefix."""
    prefix = config.buffer.key_prefix
    files = {
        path.name: path.read_bytes()
        for path in Path(config.model.path).iterdir()
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES)
    }
    record = {"config": json.dumps(_without_secrets(config)), "run_id": run_id, "at": time.time()}
    Telemetry(client, prefix).describe(record, files)


def _without_secrets(config: RunConfig) -> dict:
    """The config as actors need it, without the buffer's password or the dashboard's
    token: it goes into Redis, its AOF and every joining host's hands. An actor brings
    its own buffer URL (`relay actor --buffer`)."""
    raw = config.model_dump(mode="json")
    raw["buffer"]["url"] = None
    raw["dashboard"]["token"] = None
    return raw


def join_experiment(
    client: redis.Redis,
    key_prefix: str,
    overrides: list[str],
    cache: Path,
    timeout_s: float,
    env_type: str | None = None,
    allowed_plugins: Sequence[str] = (),
) -> tuple[RunConfig, str, Path]:
    """The experiment's config (with `overrides`), run id, and a local copy of the policy.

    `env_type` names the environment to generate for; another type than the experiment's
    starts from that environment's defaults (tune it with `env.*` overrides). An env.type
    that is an import path is imported only if `allowed_plugins` names it.
    """
    record = _wait_for_experiment(client, key_prefix, timeout_s)
    raw = json.loads(record[b"config"])
    if env_type is not None and raw["env"]["type"] != env_type:
        raw["env"] = {"type": env_type}
    for override in overrides:
        apply_override(raw, override)
    try:
        config = RunConfig.model_validate(raw, context={ALLOWED_PLUGINS: set(allowed_plugins)})
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, RunConfig)) from None
    store = RedisWeightStore(client, key_prefix)
    version = store.wait_for_newer(None, timeout_s)
    if version is None:
        raise RelayError(f"no weights were published under {key_prefix!r} within {timeout_s:g}s")
    model_dir = cache / key_prefix.replace(":", "_") / "model"
    files = _checked_files(Telemetry(client, key_prefix).description_files(), key_prefix)
    model_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (model_dir / name).write_bytes(data)
    from safetensors.torch import save_file

    tensors = {name: t.contiguous() for name, t in store.fetch(version).items()}
    save_file(tensors, str(model_dir / "model.safetensors"))
    log.info("joined experiment %s: policy v%d in %s", key_prefix, version, model_dir)
    return config, record[b"run_id"].decode(), model_dir


def _checked_files(files: dict[bytes, bytes], key_prefix: str) -> dict[str, bytes]:
    """The experiment's model files by name, every name a plain file name: anyone who can
    write to the Redis must not be able to write outside the cache (`../`, `/etc/...`)."""
    checked = {}
    for raw in files:
        name = raw.decode("utf-8", errors="replace")
        if (
            not name
            or name in (".", "..")
            or "/" in name
            or "\\" in name
            or "\0" in name
            or name != Path(name).name
        ):
            raise RelayError(
                f"refusing the experiment's model file {name!r} (in "
                f"{Keyspace(key_prefix).experiment_files}): not a plain file name; nothing was "
                "written"
            )
        checked[name] = files[raw]
    return checked


def _wait_for_experiment(client: redis.Redis, key_prefix: str, timeout_s: float) -> dict:
    """The experiment's record; an actor may start before its learner has written it."""
    telemetry = Telemetry(client, key_prefix)
    if not (record := telemetry.description()):
        log.info("waiting for experiment %s to be started by its learner", key_prefix)
        record = poll(lambda: telemetry.description() or None, timeout_s, every_s=1.0)
    if not record:
        raise RelayError(
            f"no experiment under key prefix {key_prefix!r} in this Redis after "
            f"{timeout_s:g}s: start the learner (relay run / relay learn), or pass the "
            "experiment's --prefix"
        )
    return record
