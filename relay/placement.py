"""`relay run` on the node the learner belongs on.

In a cluster with node types (deploy/ray/cluster-*.yaml) the process that starts a run —
the script of `ray submit`, the entrypoint of `ray job submit` — runs on the head, while
the learner wants a learning node. With `ray.learner_resources` set, the driver moves
into a Ray actor scheduled on a node that has those resources: the learner, its
checkpoints, the run directory and the evaluations live there. Actors are placed by
`actors.resources` as always.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from relay.config import RunConfig
from relay.errors import RelayError

log = logging.getLogger(__name__)


class PlacedDriver:
    """A Ray actor that runs `relay.driver.run` where it was scheduled."""

    def __init__(self) -> None:
        self._stop = threading.Event()

    def node(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def run(self, config_json: str, resume: bool) -> dict:
        from relay.driver import run

        return run(RunConfig.model_validate_json(config_json), resume=resume, stop=self._stop)

    def stop(self) -> None:
        """Finish the current step, checkpoint, evaluate and shut down, as on Ctrl-C."""
        self._stop.set()


def run_on_learner_node(config: RunConfig, *, resume: bool, stop: threading.Event) -> dict:
    """Run the experiment inside a `PlacedDriver` on a node with the learner's resources."""
    import ray

    if not ray.is_initialized():
        ray.init(address=config.ray.address, log_to_driver=True)
    wanted = {**config.ray.learner_resources, "GPU": config.ray.learner_num_gpus}
    driver = (
        ray.remote(PlacedDriver)
        .options(
            name=f"relay-driver:{config.buffer.key_prefix}",
            resources=config.ray.learner_resources or None,
            num_gpus=config.ray.learner_num_gpus,
            num_cpus=0,
            max_concurrency=2,  # run() blocks; stop() must get through
        )
        .remote()
    )
    log.info("waiting for a node with %s for the learner", wanted)
    try:
        node = ray.get(driver.node.remote(), timeout=config.ray.learner_wait_s)
    except ray.exceptions.GetTimeoutError:
        ray.kill(driver)
        raise RelayError(
            f"no node with {wanted} joined within ray.learner_wait_s="
            f"{config.ray.learner_wait_s:g}s: check the cluster's node types (ray status) or "
            "ray.learner_resources"
        ) from None
    log.info("relay run continues on the learner's node %s", node)
    result = driver.run.remote(with_absolute_paths(config).model_dump_json(), resume)
    asked_to_stop = False
    try:
        while not ray.wait([result], timeout=1.0)[0]:
            if stop.is_set() and not asked_to_stop:
                driver.stop.remote()
                asked_to_stop = True
        return ray.get(result)
    finally:
        ray.kill(driver)


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """Relative local paths made absolute: a Ray worker does not share this process' working
    directory, while the cluster YAMLs sync the project to the same path on every node."""
    model = config.model
    if Path(model.path).exists():
        model = model.model_copy(update={"path": str(Path(model.path).resolve())})
    return config.model_copy(update={"run_dir": config.run_dir.resolve(), "model": model})
