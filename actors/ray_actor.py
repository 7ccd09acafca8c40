"""Rollout actors as Ray actors: one vLLM engine each, restarted by Ray when they die.

`ActorSpec` is everything an actor needs (no reference to the driver), so the same spec
starts an actor inside the Ray cluster (`start_actors`) or a process outside it
(`relay actor`). A restarted actor builds its engine again, loads the latest published
version and carries on; the groups it had in flight are simply never written.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from pydantic import BaseModel, ConfigDict

from actors.config import ActorConfig, EngineConfig, EvalConfig
from buffer.config import BufferConfig
from envs.registry import EnvConfig

log = logging.getLogger(__name__)


class ActorSpec(BaseModel):
    """What one rollout actor is built from."""

    model_config = ConfigDict(extra="forbid")

    actor_id: str
    run_id: str
    seed: int
    model_path: str
    engine: EngineConfig
    env: EnvConfig
    actor: ActorConfig
    buffer: BufferConfig
    """Must carry the buffer's `url`: actors always connect to an existing Redis."""
    cpu_cores: str | None = None
    """CPU only: the cores its engine runs on (see `ActorConfig.cpu_cores`)."""
    evaluate_first: EvalConfig | None = None
    """Score the starting policy on held-out prompts with this engine before generating
    (`relay run`'s "before" figure, without an engine of its own)."""


def build_worker(spec: ActorSpec, *, restarts: int = 0) -> object:
    """The engine, the environment, the buffer client and the weight source of one actor."""
    from transformers import AutoTokenizer

    from actors.engine import build_llm
    from actors.rollout import RolloutWorker
    from envs.registry import make_env
    from weights.redis_store import RedisWeightSource, RedisWeightStore

    buffer = gate_client(spec)
    client = buffer.client
    if released := buffer.release_producer():
        log.warning("%s: released %d admission leases of its predecessor", spec.actor_id, released)
    if spec.actor.transport == "ray":
        from weights.ray_store import RayWeightSource

        weights = RayWeightSource(spec.buffer.key_prefix, timeout_s=spec.actor.weight_timeout_s)
    elif spec.actor.transport == "nccl":
        weights = None  # the learner's NcclTransport drives the updates (methods below)
    else:
        weights = RedisWeightSource(
            RedisWeightStore(client, spec.buffer.key_prefix),
            full_every=spec.actor.full_weights_every,
        )
    llm = build_llm(spec.model_path, spec.engine, spec.seed, cpu_cores=spec.cpu_cores)
    worker = RolloutWorker(
        llm,
        AutoTokenizer.from_pretrained(spec.model_path),
        make_env(spec.env),
        spec.actor,
        buffer,
        weights,
        run_id=spec.run_id,
        seed=spec.seed,
        max_model_len=spec.engine.max_model_len,
    )
    worker.restarts = restarts
    return worker


def gate_client(spec: ActorSpec) -> object:
    """The actor's side of the buffer's gate, logged in with the credential in its URL."""
    from buffer.credentials import name_from_url
    from buffer.gate import GateClient
    from buffer.server import connect

    if spec.buffer.url is None:
        raise ValueError(f"{spec.actor_id}: buffer.url is required to start an actor")
    credential = name_from_url(spec.buffer.url, spec.buffer.key_prefix)
    client = connect(spec.buffer.url, spec.buffer.outage_limit_s)
    return GateClient(client, spec.buffer, credential, spec.actor_id)


class RolloutActor:
    """The Ray actor: `run` generates until `stop`; `health` reads its figures."""

    def __init__(self, spec: ActorSpec) -> None:
        import ray

        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        self.spec = spec
        restarts = 0
        if ray.get_runtime_context().was_current_actor_reconstructed:
            restarts = gate_client(spec).count_restart()
            log.warning("%s restarted (%d so far): rejoining at the latest version",
                        spec.actor_id, restarts)  # fmt: skip
        self.worker = build_worker(spec, restarts=restarts)
        self._stop = threading.Event()
        self._evaluation: dict | None = None

    def run(self) -> dict:
        """Generate until `stop()` (after `spec.evaluate_first`); returns the final counters."""
        try:
            if self.spec.evaluate_first is not None and self._evaluation is None:
                self._evaluation = self._evaluate(self.spec.evaluate_first)
            stats = self.worker.run(self._stop)
        except Exception as error:
            self.worker.stats.errors += 1
            self.worker.stats.last_error = f"{type(error).__name__}: {error}"[:500]
            self.worker.report()
            raise
        return dict(vars(stats))

    def stop(self) -> None:
        self._stop.set()

    def evaluation(self) -> dict | None:
        """The report of `spec.evaluate_first` (None until it is done)."""
        return self._evaluation

    def _evaluate(self, config: EvalConfig) -> dict:
        """Held-out accuracy of the policy the engine holds, before any generation."""
        from dataclasses import asdict

        from actors.evaluation import evaluate

        worker = self.worker
        report = evaluate(
            worker.llm, worker.tokenizer, worker.env, config, max_model_len=worker.max_model_len
        )
        log.info(
            "%s: held-out accuracy %.1f%% on %d prompts before training (%.1fs)",
            self.spec.actor_id, 100 * report.accuracy, report.n_prompts, report.seconds,
        )  # fmt: skip
        return {**asdict(report), "model": self.spec.model_path}

    def health(self) -> dict:
        import ray

        return {**self.worker.health(), "node_ip": ray.util.get_node_ip_address()}

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        """Shut the vLLM engine (and its engine process) down before the actor ends."""
        self._stop.set()
        self.worker.llm.llm_engine.engine_core.shutdown()

    # -- NCCL weight transfer: vLLM's VLLMWeightSyncClient protocol (GPU clusters) ----------
    # Driven by the learner's `weights.nccl.NcclTransport` through vLLM's
    # RayVLLMWeightSyncClient. Written against vLLM 0.32's documented weight-transfer API;
    # not run on this project's CPU machines (NCCL needs GPUs).
    def relay_expect_version(self, version: int) -> None:
        self._incoming_version = version

    def init_weight_transfer_engine(self, request: object) -> None:
        self.worker.llm.collective_rpc(
            "init_weight_transfer_engine", kwargs={"init_info": request.init_info}
        )

    def start_weight_update(self) -> None:
        self._update_started = time.perf_counter()
        self.worker.llm.llm_engine.engine_core.call_utility("pause_scheduler", "keep", False)
        self.worker.llm.collective_rpc("start_weight_update")

    def update_weights(self, request: object) -> None:
        self.worker.llm.collective_rpc(
            "update_weights", kwargs={"update_info": request.update_info}
        )

    def finish_weight_update(self) -> None:
        llm = self.worker.llm
        try:
            llm.collective_rpc("finish_weight_update")
            (progress, *_) = llm.collective_rpc("relay_request_progress")
        finally:
            llm.llm_engine.engine_core.call_utility("resume_scheduler")
        seconds = time.perf_counter() - self._update_started
        self.worker.switch_version(self._incoming_version, progress, seconds)


def start_actors(specs: list[ActorSpec]) -> list[object]:
    """Start one Ray actor per spec with the spec's resources and restart policy."""
    import ray

    handles = []
    for spec in specs:
        options = spec.actor
        actor_class = ray.remote(RolloutActor).options(
            name=f"relay:{spec.buffer.key_prefix}:{spec.actor_id}",
            num_cpus=options.num_cpus,
            num_gpus=options.num_gpus,
            resources=options.resources or None,
            max_restarts=options.max_restarts,
            # The `run` call in progress when the actor died runs again after the restart.
            max_task_retries=options.max_restarts,
            max_concurrency=4,  # run() blocks; stop() and health() must get through
        )
        handles.append(actor_class.remote(spec))
    return handles
