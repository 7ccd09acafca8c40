"""The learner's loop: sample a batch, step, publish on schedule, checkpoint, commit.

Exactly-once training across crashes: with `checkpoint.every_steps = N > 0`, each batch
stays claimed in the buffer (recorded in the buffer's journal of held claims) until the
checkpoint that contains its update is saved; only then is it acked. A learner that dies
in between is restarted with `--resume`: it loads the checkpoint, acks what that
checkpoint holds (an interrupted commit), and gives everything else back to the buffer to
be trained on again. So no acked rollout is missing from the weights and none is in them
twice. With N = 0 batches are acked right after their step (fewer held claims, but a
crash loses the steps since the last save).

Policy versions only grow: a resumed learner continues at the checkpoint's version, or,
if versions were published after the checkpoint and then lost, just above the newest one.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from buffer.credentials import Credentials, credential_of
from buffer.replay_buffer import Batch, FencedOut, HeldBatch, ReplayBuffer
from learner.config import LearnerConfig
from learner.trainer import Learner, NonFiniteStep
from weights.publisher import WeightPublisher

log = logging.getLogger(__name__)

_WAIT_LOG_S = 30.0
_SAMPLE_POLL_S = 2.0


class NoRollouts(RuntimeError):
    """No full batch arrived within `learner.sample_timeout_s`."""


@dataclass
class LoopState:
    """Where the learner is: persisted in every checkpoint."""

    step: int = 0
    version: int = 0
    trained_groups: int = 0
    skipped_batches: int = 0
    """Batches whose loss or gradient was not finite: skipped and quarantined."""


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint under `directory` (DeepSpeed's `latest` tag)."""
    latest = directory / "latest"
    if not latest.is_file():
        return None
    return directory / latest.read_text().strip()


class TrainingLoop:
    """Runs one rank's learner against the buffer until `config.steps` or a stop request."""

    def __init__(
        self,
        learner: Learner,
        buffer: ReplayBuffer,
        config: LearnerConfig,
        checkpoint_dir: Path,
        *,
        publisher: WeightPublisher | None = None,
        on_metrics: Callable[[dict[str, float]], None] = lambda metrics: None,
        stop: threading.Event | None = None,
        evaluate: Callable[[Learner], dict[str, float]] | None = None,
        eval_every: int = 0,
        snapshot_dir: Path | None = None,
        ledger: Path | None = None,
    ) -> None:
        self.learner = learner
        self.buffer = buffer
        self.config = config
        self.checkpoint_dir = checkpoint_dir
        self.publisher = publisher if learner.rank == 0 else None
        self.on_metrics = on_metrics
        self.stop = stop or threading.Event()
        self.evaluate = evaluate if learner.rank == 0 else None
        self.eval_every = eval_every
        self.snapshot_dir = (
            snapshot_dir if learner.rank == 0 and config.snapshot_every_steps else None
        )
        """Where rank 0 exports snapshots; None when it takes none."""
        self.consumer = f"learner-{learner.rank}"
        self.ledger = ledger
        """A JSON line per step (the entry ids trained) and per commit (the ids acked): a
        record of what this rank trained on, kept apart from the buffer (for audits)."""
        self.state = LoopState()
        self._held: list[Batch] = []
        """Batches trained on and waiting for the checkpoint that commits them."""
        self._in_flight: Batch | None = None
        """The batch being trained on (or waiting for its ack, without checkpoints)."""
        self._claims_lock = threading.Lock()
        self._saved_step: int | None = None

    # -- start -------------------------------------------------------------------------------
    def start(self, resume: bool) -> LoopState:
        """Fresh start or resume; publishes the weights actors should start from."""
        restored = self.learner.load_checkpoint(self.checkpoint_dir) if resume else None
        leftover = self.buffer.held(self.consumer)
        if restored is None:
            if resume:
                log.info("no checkpoint in %s: starting from step 0", self.checkpoint_dir)
            self.buffer.abandon(self.consumer, leftover)
            self.state = LoopState(version=self.buffer.version())
        else:
            self.state = LoopState(**restored["loop"])
            self._finish_interrupted_commit(leftover)
            published = self.buffer.version()
            if published > self.state.version:
                log.warning(
                    "versions %d..%d were published after the checkpoint at step %d and "
                    "are lost; continuing at version %d",
                    self.state.version + 1, published, self.state.step, published + 1,
                )  # fmt: skip
                self.state.version = published + 1
            log.info(
                "resumed at step %d, policy version %d (%d groups trained so far)",
                self.state.step, self.state.version, self.state.trained_groups,
            )  # fmt: skip
        if self.publisher is not None:
            self.publisher.publish(self.state.version, self.learner.state_dict())
            self.publisher.drain()
        return self.state

    def _finish_interrupted_commit(self, leftover: list[HeldBatch]) -> None:
        """Ack what the checkpoint holds; give back what was held after it."""
        record = latest_checkpoint(self.checkpoint_dir) / f"relay-{self.consumer}.json"
        in_checkpoint = set(json.loads(record.read_text())["committed"] if record.exists() else [])
        done = [b for b in leftover if b.token in in_checkpoint]
        lost = [b for b in leftover if b.token not in in_checkpoint]
        if done:
            result = self.buffer.commit(self.consumer, done)
            self._record({"acked": result.acked_ids})
            log.info("acked %d groups whose update the checkpoint holds", result.acked)
        if lost:
            self.buffer.abandon(self.consumer, lost)
            log.info(
                "gave %d groups trained after the checkpoint back to the buffer",
                sum(len(b.entry_ids) for b in lost),
            )

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> LoopState:
        """Train until `config.steps` (counting resumed steps) or a stop request."""
        immediate_ack = self.config.checkpoint.every_steps == 0
        to_ack: Batch | None = None
        limit = self.config.time_limit_s
        deadline = None if limit is None else time.monotonic() + limit
        if self.snapshot_dir is not None and not self.state.step:
            self.snapshot()  # the starting policy, timed at the start of training
        heartbeat = threading.Event()
        threading.Thread(target=self._renew_claims, args=(heartbeat,), daemon=True).start()
        try:
            while self.state.step < self.config.steps:
                if deadline is not None and time.monotonic() >= deadline:
                    log.info("learner.time_limit_s=%g reached at step %d", limit, self.state.step)
                    self.stop.set()
                if self.learner.any_rank(self.stop.is_set()):
                    log.info("stop requested: finishing at step %d", self.state.step)
                    break
                batch, wait_s = self._sample(to_ack if immediate_ack else None)
                to_ack = None
                if self.learner.any_rank(batch is None):
                    if batch is not None:  # another rank is stopping: give this batch back
                        self.buffer.abandon(self.consumer, [batch])
                    break
                with self._claims_lock:
                    if immediate_ack:
                        to_ack = self._in_flight = batch
                    else:
                        self._held.append(batch)
                if not self._train(batch, wait_s):
                    to_ack = None
        finally:
            if to_ack is not None:
                self._record({"acked": self.buffer.ack(to_ack).acked_ids})
            heartbeat.set()
        if self.snapshot_dir is not None and self.state.step % self.config.snapshot_every_steps:
            self.snapshot()  # the final policy, so that a curve ends where the run did
        if self._saved_step != self.state.step:
            self.checkpoint()
        return self.state

    def _sample(self, ack: Batch | None) -> tuple[Batch | None, float]:
        started = time.monotonic()
        last_log = started
        while not self.stop.is_set():
            batch = self.buffer.sample(
                self.config.batch_groups,
                timeout_s=_SAMPLE_POLL_S,
                ack=ack,
                hold_as=self.consumer if self.config.checkpoint.every_steps else None,
            )
            ack = None
            if batch.previous_ack is not None:
                self._record({"acked": batch.previous_ack.acked_ids})
            if batch.groups:
                return batch, time.monotonic() - started
            waited = time.monotonic() - started
            if waited > self.config.sample_timeout_s:
                dropped = self.buffer.counter("dropped_stale")
                raise NoRollouts(
                    f"no batch of {self.config.batch_groups} groups within "
                    f"learner.sample_timeout_s={self.config.sample_timeout_s:g}s: are actors "
                    f"writing to this buffer (key prefix {self.buffer.config.key_prefix!r})? "
                    f"{dropped} groups were dropped so far as staler than "
                    f"buffer.max_staleness={self.buffer.config.max_staleness}"
                )
            if time.monotonic() - last_log > _WAIT_LOG_S:
                log.info("waiting for rollouts (%.0fs so far)", waited)
                last_log = time.monotonic()
        return None, time.monotonic() - started

    def _train(self, batch: Batch, wait_s: float) -> bool:
        """One step on `batch`; False when it was skipped and quarantined instead."""
        groups = [g.group for g in batch.groups]
        try:
            metrics = self.learner.step(groups, self.state.version)
        except NonFiniteStep as error:
            self._quarantine(batch, str(error))
            return False
        if self.config.checkpoint.every_steps:
            # Held until the checkpoint acks it, but its groups may be used again now.
            self.buffer.offer_replays(batch)
        self._check_behaviour(groups)
        self.state.step += 1
        self.state.trained_groups += len(groups)
        self._record({"step": self.state.step, "version": self.state.version,
                      "trained": batch.entry_ids})  # fmt: skip
        publish_s = 0.0
        if self.state.step % self.config.push_every_steps == 0:
            self.state.version += 1
            if self.publisher is not None:
                publish_s = self.publisher.publish(self.state.version, self.learner.state_dict())
        every = self.config.checkpoint.every_steps
        if every and self.state.step % every == 0:
            self.checkpoint()
        rewards = [c.reward for g in groups for c in g.completions]
        metrics.update({
            "step": self.state.step,
            "version": self.state.version,
            "groups": float(len(groups)),
            "learner/reward_mean": sum(rewards) / len(rewards),
            "learner/wait_s": wait_s,
            "learner/publish_block_s": publish_s,
            "learner/sampled_staleness_max": float(max(g.staleness for g in batch.groups)),
            "learner/replayed_fraction": sum(g.reuse > 0 for g in batch.groups) / len(groups),
        })  # fmt: skip
        if self.evaluate is not None and self.eval_every and self.state.step % self.eval_every == 0:
            metrics.update(self.evaluate(self.learner))
        if (
            self.snapshot_dir is not None
            and self.state.step % self.config.snapshot_every_steps == 0
        ):
            self.snapshot()
        metrics["learner/skipped_batches"] = float(self.state.skipped_batches)
        self.on_metrics(metrics)
        return True

    def _check_behaviour(self, groups: list) -> None:
        """Revoke the credential of a producer whose fresh groups' log-probs are not what
        the learner's own weights give (`learner.max_behaviour_gap`): the step is done, but
        its credential's other groups are quarantined when sampled."""
        limit = self.config.max_behaviour_gap
        for group, gap in zip(groups, self.learner.behaviour_gaps, strict=False):
            if gap > limit:  # NaN (no fresh completion) compares False
                credentials = Credentials(self.buffer.client, self.buffer.config.key_prefix)
                reason = (
                    f"group {group.group_id!r}: behaviour log-probs {gap:.3g} nats from "
                    f"the learner's at staleness 0 (learner.max_behaviour_gap={limit:g})"
                )
                if credential_of(group.actor_id) in credentials.active():
                    credentials.revoke(credential_of(group.actor_id), reason)
                log.warning("producer %s: %s", group.actor_id, reason)

    def _quarantine(self, batch: Batch, reason: str) -> None:
        """A batch whose update was skipped goes to quarantine, never to be trained or
        published; the step does not count."""
        with self._claims_lock:
            held = batch in self._held
            if held:
                self._held.remove(batch)
        if held:
            self.buffer.forget_held(self.consumer, [batch])
        quarantined = self.buffer.quarantine(batch, f"learner step {self.state.step + 1}: {reason}")
        self.state.skipped_batches += 1
        log.warning(
            "skipped a batch of %d groups at step %d (%s): its update was not applied and "
            "the groups are quarantined (%d skipped so far)",
            quarantined, self.state.step + 1, reason, self.state.skipped_batches,
        )  # fmt: skip

    def snapshot(self) -> Path:
        """Export the current policy for evaluation after the run; listed with its time."""
        path = self.learner.export(self.snapshot_dir / f"step{self.state.step:08d}")
        record = {"step": self.state.step, "version": self.state.version,
                  "time": time.time(), "path": str(path)}  # fmt: skip
        with (self.snapshot_dir / "snapshots.jsonl").open("a") as out:
            out.write(json.dumps(record) + "\n")
        return path

    def _renew_claims(self, stop: threading.Event) -> None:
        """Heartbeat: renew every claim this loop holds three times per visibility timeout,
        from a thread of its own, whatever the loop is doing meanwhile (a long evaluation,
        a slow publish, a checkpoint), so that no claim expires under a live learner and
        no group is trained twice."""
        while not stop.wait(self.buffer.config.visibility_timeout_s / 3):
            with self._claims_lock:
                claims = [*self._held, *([self._in_flight] if self._in_flight else [])]
            try:
                if claims:
                    self.buffer.extend(claims)
            except (redis.RedisError, FencedOut) as error:  # the loop meets it too, and stops
                log.warning("could not renew %d held claims: %s", len(claims), error)

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint(self) -> Path:
        """Save everything needed to resume, then ack the batches the checkpoint holds."""
        if self.publisher is not None:
            self.publisher.drain()
        tag = f"step{self.state.step:08d}"
        path = self.checkpoint_dir / tag
        path.mkdir(parents=True, exist_ok=True)
        # Written before DeepSpeed moves `latest` to this tag, so a crash in between can
        # only leave a record that no `latest` points to.
        record = {"loop": vars(self.state), "committed": [b.token for b in self._held]}
        (path / f"relay-{self.consumer}.json").write_text(json.dumps(record))
        started = time.perf_counter()
        self.learner.save_checkpoint(self.checkpoint_dir, tag, {"loop": dict(vars(self.state))})
        result = self.buffer.commit(self.consumer, self._held)
        self._record({"acked": result.acked_ids})
        self._saved_step = self.state.step
        with self._claims_lock:
            self._held = []
        log.info(
            "checkpoint %s: step %d, version %d, %d groups acked (%.1fs)",
            path, self.state.step, self.state.version, result.acked,
            time.perf_counter() - started,
        )  # fmt: skip
        if self.learner.rank == 0:
            self._prune()
        return path

    def _record(self, entry: dict) -> None:
        if self.ledger is not None:
            with self.ledger.open("a") as out:
                out.write(json.dumps(entry) + "\n")

    def _prune(self) -> None:
        tags = sorted(p for p in self.checkpoint_dir.glob("step*") if p.is_dir())
        for old in tags[: -self.config.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)
