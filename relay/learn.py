"""`relay learn`: the learner process(es) of an experiment, against its buffer.

Wires the learner to the buffer and the weight store: one process per data-parallel rank,
rank 0 publishing weights and writing metrics. `relay run` uses the same function with
the actors beside it.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from buffer.gate import Gate
from buffer.replay_buffer import ReplayBuffer
from buffer.server import connect, free_port
from buffer.telemetry import Telemetry
from relay.config import RunConfig
from relay.errors import RelayError
from relay.experiment import publish_experiment
from relay.trackers import Trackers
from weights.redis_store import RedisWeightStore
from weights.wire import WIRE_DTYPES, FrameEncoder

log = logging.getLogger(__name__)


def checkpoint_dir(config: RunConfig) -> Path:
    return config.run_dir / "checkpoints"


def check_resume(config: RunConfig, resume: bool) -> None:
    """Refuse to start over a run directory that holds a checkpoint, unless resuming."""
    from learner.loop import latest_checkpoint

    found = latest_checkpoint(checkpoint_dir(config))
    if found is not None and not resume:
        raise RelayError(
            f"{config.run_dir} holds a checkpoint ({found.name}): add --resume to continue "
            "that run, or set run_dir to start a new one"
        )


def learn(
    config: RunConfig,
    *,
    resume: bool,
    rank: int = 0,
    master_port: int | None = None,
    stop: threading.Event | None = None,
    on_metrics: Callable[[dict], None] = lambda metrics: None,
    ray_transport: bool = False,
    evaluate: Callable[[object], dict] | None = None,
):
    """Run one learner rank to the end (or a stop); rank 0 exports the final policy.

    Rank 0 publishes weights to the Redis weight store (actors anywhere can follow it)
    and, with `ray_transport`, to Ray's object store for the actors in the Ray cluster.
    """
    from learner.loop import NoRollouts, TrainingLoop
    from learner.trainer import Learner
    from weights.publisher import PublishError, WeightPublisher

    if config.buffer.url is None:
        raise RelayError("relay learn needs buffer.url (the experiment's Redis)")
    client = connect(config.buffer.url, config.buffer.outage_limit_s)
    buffer = ReplayBuffer(client, config.buffer)
    telemetry = Telemetry(client, config.buffer.key_prefix)
    learner = Learner(
        config.model.path, config.learner, rank=rank, world_size=config.learner.world_size,
        master_port=master_port or free_port(), seed=config.seed,
        temperature=config.actors.sampling.temperature,
    )  # fmt: skip
    # Rank 0 takes a new learner epoch; every rank writes under it. Any older learner of
    # this experiment (a zombie of a crashed run, a second `relay learn` by mistake) is
    # refused from now on: it can no longer commit, claim or publish.
    epoch = buffer.fence_out_older_learners() if rank == 0 else 0
    buffer.fence_out_older_learners(int(learner.all_reduce_sum(epoch)))
    publisher = None
    if rank == 0:
        if config.actors.transport == "nccl" and config.actors.num_actors > 0:
            raise RelayError(
                "actors.transport: nccl is accepted on CUDA machines, but relay run does not "
                "drive weights/nccl.py's NcclTransport yet (it was never run: this project's "
                "machines have no GPU); use ray inside one Ray cluster"
            )
        publish_experiment(client, config, run_id=config.run_dir.name)
        store = RedisWeightStore(client, config.buffer.key_prefix)
        store.epoch = buffer.epoch
        stored = store.latest_version()
        if stored is not None and stored > buffer.version():
            # A learner died between writing weights and bumping the version: finish it,
            # so that no version an actor may have fetched is ever reused.
            buffer.set_version(stored)
        transports = []
        if _weights_in_redis(config, ray_transport):
            transports.append(store)
        if ray_transport:
            from weights.ray_store import RayObjectTransport

            transports.append(RayObjectTransport(config.buffer.key_prefix))
        publisher = WeightPublisher(
            transports, on_published=buffer.set_version, encoder=FrameEncoder(
                wire_dtype(config), deltas=any(t is store for t in transports)
            ),
        )  # fmt: skip
    metrics_file = config.run_dir / "metrics.jsonl"
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    trackers = Trackers(config, resume) if rank == 0 else None

    def record(metrics: dict) -> None:
        if trackers is not None:
            metrics = {**metrics, "time": time.time()}
            with metrics_file.open("a") as out:
                out.write(json.dumps(metrics) + "\n")
            telemetry.record_metrics("learner", metrics)
            trackers.log(metrics)
        on_metrics(metrics)

    loop = TrainingLoop(
        learner, buffer, config.learner, checkpoint_dir(config),
        publisher=publisher, on_metrics=record, stop=stop,
        evaluate=evaluate, eval_every=config.eval.every_steps,
        snapshot_dir=config.run_dir / "snapshots",
        ledger=config.run_dir / f"ledger-learner-{rank}.jsonl",
    )  # fmt: skip
    try:
        loop.start(resume)
        state = loop.run()
    except (NoRollouts, PublishError) as error:
        raise RelayError(str(error)) from error
    finally:
        if publisher is not None:
            publisher.close()
        if trackers is not None:
            trackers.close()
    if rank == 0:
        out = learner.export(config.run_dir / "policy")
        log.info("saved the policy (version %d) to %s", state.version, out)
        if publisher is not None and publisher.timings:
            blocking = [t.blocking_s for t in publisher.timings]
            log.info(
                "publishing held the learner %.3fs per version on average (%d versions)",
                sum(blocking) / len(blocking), len(blocking),
            )  # fmt: skip
    learner.close()
    return state


@contextmanager
def serving_gate(config: RunConfig, stop: threading.Event) -> Iterator[Gate]:
    """Serve the actors' requests (buffer/gate.py) for as long as the block runs: around
    the learner and the actors' shutdown, so that actors can give their leases back. It
    spot-checks rewards with this run's environment. A failure of the gate stops the run
    (no actor could put any more) and is raised at the end of the block."""
    buffer = ReplayBuffer(connect(config.buffer.url, config.buffer.outage_limit_s), config.buffer)
    spot_check = None
    if config.buffer.spot_check_fraction > 0:
        from transformers import AutoTokenizer

        from actors.spot_check import RewardCheck
        from envs.registry import make_env

        tokenizer = AutoTokenizer.from_pretrained(config.model.path)
        spot_check = RewardCheck(make_env(config.env), tokenizer)
    gate = Gate(buffer, on_failure=stop.set, spot_check=spot_check, seed=config.seed).start()
    try:
        yield gate
    finally:
        gate.stop()
    if gate.failure is not None:
        raise RelayError(f"the buffer's gate failed, so actors could not put: {gate.failure}")


def wire_dtype(config: RunConfig) -> torch.dtype:
    """The dtype weights travel in (`actors.weight_dtype`; auto: the engines' own)."""
    name = config.actors.weight_dtype
    return WIRE_DTYPES[config.engine.dtype if name == "auto" else name]


def _weights_in_redis(config: RunConfig, ray_transport: bool) -> bool:
    """Whether weights go to the buffer's Redis: always for actors that fetch them there,
    and by default when the run has no actors of its own (they join with `relay actor`)."""
    if not ray_transport or config.actors.weights_in_redis:
        return True
    return config.actors.weights_in_redis is None and config.actors.num_actors == 0


def learn_all_ranks(config: RunConfig, *, resume: bool, stop: threading.Event, **rank0: object):
    """Rank 0 here, ranks 1.. in spawned processes; SIGTERM/Ctrl-C stop all after a checkpoint.

    `rank0` (on_metrics, ray_transport, evaluate) goes to `learn` on rank 0 only: the
    other ranks neither publish nor report. Returns rank 0's final loop state.
    """
    port = free_port()
    context = multiprocessing.get_context("spawn")
    others = [
        context.Process(target=_rank_main, args=(config, resume, rank, port), daemon=False)
        for rank in range(1, config.learner.world_size)
    ]
    for process in others:
        process.start()
    try:
        state = learn(config, resume=resume, rank=0, master_port=port, stop=stop, **rank0)
    finally:
        for process in others:
            process.join(timeout=120)
            if process.is_alive():
                process.terminate()
    failed = [p.exitcode for p in others if p.exitcode]
    if failed:
        raise RelayError(f"learner ranks exited with codes {failed}")
    return state


def _rank_main(config: RunConfig, resume: bool, rank: int, port: int) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    learn(config, resume=resume, rank=rank, master_port=port, stop=stop)
