"""`relay run`: one experiment end to end — buffer, Ray, actors, learner, evaluation.

On a laptop it starts everything itself (an embedded redis-server, a local Ray); inside
a cluster (`ray job submit`, `ray submit`) it joins the running Ray and, when
`buffer.url` is set, an external Redis. The learner runs in this process (rank 0; more
ranks as processes beside it), the actors as Ray actors. Everything started here is
stopped here, on completion, on error and on Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from relay.config import RunConfig, dump_config
from relay.errors import RelayError

log = logging.getLogger(__name__)

_SUPERVISE_EVERY_S = 5.0
BUFFER_URL_FILE = "buffer.url"
"""In run_dir while a run with an embedded Redis goes on: its URL, readable by the owner only."""


def run(
    config: RunConfig,
    *,
    resume: bool,
    stop: threading.Event,
    on_metrics: Callable[[dict], None] = lambda metrics: None,
) -> dict:
    """Run the experiment; returns the results written to run_dir/results.json."""
    from buffer.server import open_redis
    from relay.learn import check_resume, serving_gate

    check_resume(config, resume)
    for note in config.notes:
        log.warning(note)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    (config.run_dir / "config.yaml").write_text(dump_config(config))
    started = time.monotonic()
    results: dict = {"run_dir": str(config.run_dir), "mode": config.mode}
    with ExitStack() as cleanup:
        client, server = open_redis(
            config.buffer.url, config.redis, config.run_dir / "redis", config.buffer.outage_limit_s
        )
        dashboard_client = None
        if server is not None:
            cleanup.callback(server.stop)
            config.buffer.url = server.url
            cleanup.callback(_share_buffer_url(config.run_dir, server.url))
            dashboard_client = server.client(config.buffer.outage_limit_s, role="dashboard")
        if config.dashboard.enabled:
            results["dashboard"] = _start_dashboard(config, dashboard_client or client, cleanup)
        # The starting policy is scored by the first actor, on its engine, before it
        # generates: no engine of its own to start, and the learner starts meanwhile.
        before = config.eval.before and not resume
        if before and config.actors.num_actors == 0:
            results["before"] = _evaluate(config, config.model.path)
        _start_ray(config, cleanup)
        # Credentials first: the gate, as it starts, recreates the users a restarted Redis
        # lost from their stored hashes, and must not race a new password being issued.
        actor_urls = _actor_urls(config, client)
        # Before the actors: it must serve them until they have stopped.
        cleanup.enter_context(serving_gate(config, stop))
        actors = Actors(config, actor_urls, evaluate_first=before)
        cleanup.callback(actors.shutdown)
        actors.start()
        state = _learn(config, resume, stop, actors, on_metrics)
        results["steps"] = state.step
        results["version"] = state.version
        results["trained_groups"] = state.trained_groups
        results["actors"] = actors.health()
        if before and actors.specs:
            results["before"] = actors.first_evaluation()
        actors.shutdown()
        results["policy"] = str(config.run_dir / "policy")
        results["after"] = _evaluate(config, results["policy"])
    results["seconds"] = round(time.monotonic() - started, 1)
    (config.run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _actor_urls(config: RunConfig, client) -> list[str]:
    """One credential per actor of the run (least privilege: each may only put through
    the gate, and a misbehaving one is revoked alone); their buffer URLs."""
    from buffer.credentials import Credentials, credential_url

    credentials = Credentials(client, config.buffer.key_prefix)
    prefix = config.buffer.key_prefix
    names = [f"actor-{i}" for i in range(config.actors.num_actors)]
    passwords = [credentials.create(name, rekey=True) for name in names]
    return [
        credential_url(config.buffer.url, prefix, name, password)
        for name, password in zip(names, passwords, strict=True)
    ]


def _share_buffer_url(run_dir: Path, url: str) -> Callable[[], None]:
    """Write the embedded Redis' URL (it holds the password) where `relay status -c` and
    `relay dashboard -c` look for it; returns the clean-up that removes it."""
    path = run_dir / BUFFER_URL_FILE
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(url + "\n")
    return lambda: path.unlink(missing_ok=True)


def _start_dashboard(config: RunConfig, client, cleanup: ExitStack) -> str:
    from buffer.replay_buffer import ReplayBuffer
    from relay.dashboard.server import Dashboard
    from relay.dashboard.snapshot import Watcher

    dashboard = Dashboard(Watcher(ReplayBuffer(client, config.buffer)), config.dashboard)
    cleanup.callback(dashboard.stop)
    return dashboard.start().url


def _start_ray(config: RunConfig, cleanup: ExitStack) -> None:
    import ray

    if ray.is_initialized():
        return
    if config.ray.address is not None:
        ray.init(address=config.ray.address, log_to_driver=True)
        log.info("joined the Ray cluster at %s", config.ray.address)
        return
    ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False, log_to_driver=True)
    cleanup.callback(ray.shutdown)
    log.info("started a local Ray (%s CPUs)", ray.cluster_resources().get("CPU"))


def _learn(config: RunConfig, resume: bool, stop: threading.Event, actors: Actors, on_metrics):
    from relay.learn import learn_all_ranks

    evaluate = None
    if config.eval.every_steps:
        evaluate = _in_run_evaluation(config)
    # Watch the actors from a thread of its own: a learner waiting for rollouts reports
    # nothing, and that is exactly when a failed actor must be noticed.
    done = threading.Event()
    failure: list[BaseException] = []

    def watch() -> None:
        while not done.wait(_SUPERVISE_EVERY_S):
            try:
                actors.supervise()
            except BaseException as error:
                failure.append(error)
                stop.set()
                return

    watcher = threading.Thread(target=watch, name="relay-actor-watch", daemon=True)
    watcher.start()
    try:
        state = learn_all_ranks(
            config, resume=resume, stop=stop, on_metrics=on_metrics,
            ray_transport=config.actors.transport == "ray", evaluate=evaluate,
        )  # fmt: skip
    finally:
        done.set()
        watcher.join()
    if failure:
        raise failure[0]
    return state


def _in_run_evaluation(config: RunConfig) -> Callable[[object], dict]:
    from envs.base import Split
    from envs.registry import make_env
    from relay.evaluate import greedy_accuracy

    env = make_env(config.env)
    if env.max_turns != 1:
        log.warning("eval.every_steps: in-run accuracy covers single-turn tasks only; skipped")
        return lambda learner: {}
    prompts = env.prompts(Split.TEST, config.eval.in_run_prompts, config.eval.seed)

    def evaluate(learner) -> dict:
        accuracy = greedy_accuracy(
            learner.engine.module, learner.tokenizer, env, prompts, config.eval.max_tokens
        )
        return {"eval/greedy_accuracy": accuracy}

    return evaluate


def _evaluate(config: RunConfig, model_path: str) -> dict:
    """Held-out accuracy on vLLM, with an engine that is shut down right after."""
    from transformers import AutoTokenizer

    from actors.engine import build_llm
    from actors.evaluation import evaluate
    from envs.registry import make_env

    if not (Path(model_path) / "config.json").is_file():
        raise RelayError(f"no model at {model_path}: run `relay model init` (and warmstart)")
    llm = build_llm(model_path, config.engine, config.seed)
    try:
        report = evaluate(
            llm, AutoTokenizer.from_pretrained(model_path), make_env(config.env), config.eval,
            max_model_len=config.engine.max_model_len,
        )  # fmt: skip
    finally:
        llm.llm_engine.engine_core.shutdown()
    log.info("%s: held-out accuracy %.1f%% on %d prompts", model_path, 100 * report.accuracy,
             report.n_prompts)  # fmt: skip
    result = asdict(report)
    result["model"] = model_path
    return result


def _cycled(choices: list[str] | None, index: int) -> str | None:
    return None if not choices else choices[index % len(choices)]


class Actors:
    """The run's rollout actors: started, watched, stopped."""

    def __init__(
        self, config: RunConfig, buffer_urls: list[str], evaluate_first: bool = False
    ) -> None:
        """`buffer_urls`: each actor's own URL, with its credential (see `_actor_urls`);
        `evaluate_first`: the first actor scores the starting policy before generating."""
        from actors.ray_actor import ActorSpec

        self.config = config
        self.specs = [
            ActorSpec(
                actor_id=f"actor-{i}",
                run_id=config.run_dir.name,
                seed=config.seed * 1000 + i,
                model_path=config.model.path,
                engine=config.engine,
                env=config.env,
                actor=config.actors,
                buffer=config.buffer.model_copy(update={"url": buffer_urls[i]}),
                cpu_cores=_cycled(config.actors.cpu_cores, i),
                evaluate_first=config.eval if evaluate_first and i == 0 else None,
            )
            for i in range(config.actors.num_actors)
        ]
        self.handles: list = []
        self.runs: list = []
        self.loop_restarts = [0] * len(self.specs)
        self.registry = None

    def start(self) -> None:
        from actors.ray_actor import start_actors

        if self.config.actors.transport == "ray":
            from weights.ray_store import weight_registry

            # Held for the whole run: the registry lives while someone references it, and
            # the actors must outlive the learner's publisher at the end.
            self.registry = weight_registry(self.config.buffer.key_prefix)
        self.handles = start_actors(self.specs)
        self.runs = [handle.run.remote() for handle in self.handles]
        log.info("started %d rollout actors", len(self.handles))
        if not self.handles:
            log.warning(
                "actors.num_actors is 0: waiting for actors to join with `relay actor --buffer "
                "URL --prefix %s`, URL from `relay actor-credential create NAME -c CONFIG`",
                self.config.buffer.key_prefix,
            )  # fmt: skip

    def supervise(self) -> None:
        """Restart the generation loop of an actor whose `run` failed (Ray restarts dead
        processes itself); give up on one that keeps failing."""
        import ray

        for i, ref in enumerate(self.runs):
            done, _ = ray.wait([ref], timeout=0)
            if not done:
                continue
            try:
                ray.get(ref)
                continue  # finished: only after stop()
            except Exception as error:  # the actor's own error, or it died for good
                self.loop_restarts[i] += 1
                if self.loop_restarts[i] > self.config.actors.max_restarts:
                    raise RelayError(
                        f"{self.specs[i].actor_id} failed {self.loop_restarts[i]} times; last "
                        f"error: {error}. Its health record in the buffer has details."
                    ) from error
                log.warning("%s failed (%s); restarting its loop", self.specs[i].actor_id,
                            str(error).splitlines()[0][:200])  # fmt: skip
                self.runs[i] = self.handles[i].run.remote()

    def first_evaluation(self) -> dict | None:
        """The first actor's held-out report of the starting policy (None if it has none)."""
        import ray

        try:
            report = ray.get(self.handles[0].evaluation.remote(), timeout=60)
        except Exception as error:  # a dead actor must not hide the run's results
            log.warning("no held-out figure before training: %s", str(error).splitlines()[0])
            return None
        if report is None:
            log.warning("the first actor did not score the starting policy (it restarted?)")
        return report

    def health(self) -> dict:
        import ray

        try:
            return {s.actor_id: ray.get(h.health.remote(), timeout=30)
                    for s, h in zip(self.specs, self.handles, strict=True)}  # fmt: skip
        except Exception as error:  # a dead actor must not hide the run's results
            return {"error": str(error)}

    def shutdown(self) -> None:
        """Stop every actor's loop (leases given back), then end the actor processes."""
        import ray

        if not self.handles:
            return
        handles, self.handles = self.handles, []
        for handle in handles:
            handle.stop.remote()
        try:
            ray.get(self.runs, timeout=120)
        except Exception as error:
            log.warning("an actor did not stop cleanly: %s", str(error).splitlines()[0])
        for handle in handles:
            try:
                ray.get(handle.close.remote(), timeout=60)
            except Exception as error:
                log.warning("an actor's engine did not shut down: %s", str(error).splitlines()[0])
            ray.kill(handle)
        log.info("stopped %d rollout actors", len(handles))
