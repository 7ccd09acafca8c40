"""The rollout loop of one actor: keep an engine busy with episodes, tag every token.

`RolloutWorker` drives a vLLM engine one step at a time (`LLMEngine.step`), which is what
makes the rest possible:

- continuous admission: a group that finishes is put into the buffer at once and a new
  one takes its place, so long episodes never hold back short ones;
- multi-turn episodes: when a turn ends, the environment answers and the episode goes
  back into the engine as a new request with the whole conversation so far;
- weights in flight: between two engine steps the worker loads a newer policy version
  into the running engine. vLLM's worker reports how many tokens each running request
  had sampled at that moment (the engine process runs ahead of the outputs this process
  has seen), so every token is tagged with the version that really sampled it.
  `weight_updates: drain` instead stops admitting, finishes what runs, then loads.

A group is written only when all its episodes are verified: an actor that dies never
leaves half a group behind (its admission leases expire and are counted).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from actors.config import ActorConfig
from actors.engine import Sample, to_sample
from actors.episodes import (
    Episode,
    drop_trailing_context,
    out_of_room,
    render_prompt,
    take_turn,
)
from buffer.gate import GateClient
from buffer.schema import Completion, RolloutGroup, VersionRuns
from buffer.server import shorten_outages
from envs.base import Environment, Prompt, Split
from weights.engine import load_chunks, paused_engine
from weights.wire import WeightSource, WeightsUnavailable

log = logging.getLogger(__name__)

_PROMPTS_PER_DRAW = 64
_IDLE_SLEEP_S = 0.02
_ADMIT_RETRY_S = 0.025  # after a reservation got fewer leases than asked
_LOAD_ATTEMPTS = 5
_PUTS_IN_FLIGHT = 4


@dataclass
class _Running:
    """An episode in the engine, with the policy version of each of its tokens."""

    group: _Group
    episode: Episode
    versions: list[int] = field(default_factory=list)
    request_id: str = ""
    turn: int = 0
    turn_version: int = 0
    """The version the current turn started with."""
    switches: list[tuple[int, int]] = field(default_factory=list)
    """(tokens of this turn sampled before the switch, new version), in order."""


@dataclass
class _Group:
    group_id: str
    prompt: Prompt
    lease: str
    episodes: list[_Running] = field(default_factory=list)
    finished: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass
class ActorStats:
    """Counters an actor reports (see `RolloutWorker.health`)."""

    groups: int = 0
    uniform_groups: int = 0
    """Finished groups dropped because their rewards were all equal (skip_uniform_groups)."""
    tokens: int = 0
    """Sampled tokens (the policy's, not the environment's)."""
    prompt_tokens: int = 0
    """Context tokens sent for prefill: each turn's context once (a group's episodes
    share one request on their first turn)."""
    busy_s: float = 0.0
    idle_s: float = 0.0
    admission_wait_s: float = 0.0
    """Idle time while admission control granted fewer groups than there was room for:
    the actor was ahead of the learner by the staleness bound."""
    weight_loads: int = 0
    weight_load_s: float = 0.0
    """Time the engine was paused for loads (fetching happens beforehand, while it runs)."""
    weight_wait_s: float = 0.0
    """Idle time while a newer version was on its way: no new group starts on old weights,
    since admission control counts it from the newest version."""
    errors: int = 0
    last_error: str = ""


class RolloutWorker:
    """One engine, one environment stream, one producer id in the buffer."""

    def __init__(
        self,
        llm: object,
        tokenizer: object,
        env: Environment,
        config: ActorConfig,
        buffer: GateClient,
        weights: WeightSource | None,
        *,
        run_id: str,
        seed: int,
        max_model_len: int,
    ) -> None:
        self.llm = llm
        self.engine = llm.llm_engine
        self.tokenizer = tokenizer
        self.env = env
        self.config = config
        self.buffer = buffer
        self.weights = weights
        self.actor_id = buffer.producer_id
        """The producer id its groups carry, bound to its credential by the gate."""
        self.run_id = run_id
        self.seed = seed
        self.max_model_len = max_model_len
        self.version = buffer.version() if weights is None else -1
        """The policy version loaded in the engine (-1: not known yet)."""
        self.stats = ActorStats()
        self._prompts = self._prompt_stream()
        self._groups: list[_Group] = []
        self._running: dict[str, _Running] = {}
        self._follower: _Follower | None = None
        self._sender: ThreadPoolExecutor | None = None
        self._put_channel: GateClient | None = None
        self._puts: deque[tuple[Future[list], int]] = deque()
        """Puts on their way: (their future, groups kept), oldest first."""
        self._next_report = 0.0
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._admit_limit: int | None = None
        self._refused = False
        """The last reservation got fewer leases than there was room for."""
        self._next_admit = 0.0
        self.restarts = 0
        """How many times Ray restarted this actor (reported in `health`)."""

    # -- the loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event, max_groups: int | None = None) -> ActorStats:
        """Generate until `stop` is set, or until `max_groups` groups were put (no more are
        started than that: benchmarks and tests get exactly the work they ask for)."""
        self._admit_limit = max_groups
        finished = threading.Event()
        threading.Thread(target=self._on_stop, args=(stop, finished), daemon=True).start()
        try:
            if self.weights is not None:
                self.start_following()
            while not stop.is_set() and (
                max_groups is None or self.stats.groups + self._sending < max_groups
            ):
                self.step()
        finally:
            self._abandon_unfinished()
            self.report()
            finished.set()
        return self.stats

    def _on_stop(self, stop: threading.Event, finished: threading.Event) -> None:
        # Once asked to stop, a buffer that does not answer (the run ended and took its
        # Redis along) is given up on within seconds, not after buffer.outage_limit_s.
        while not finished.is_set():
            if stop.wait(0.5):
                shorten_outages(self.buffer.client)
                return

    def step(self) -> list[RolloutGroup]:
        """One iteration: new weights if due, admit groups, one engine step; returns groups put."""
        now = time.monotonic()
        self._collect_puts()
        if self._follower is not None:
            self._take_weights()
        if self._pending_version is None:
            self._admit()
        if not self._running:
            time.sleep(_IDLE_SLEEP_S)
            idle = time.monotonic() - now
            self.stats.idle_s += idle
            if self._refused:
                self.stats.admission_wait_s += idle
            if self._pending_version is not None:
                self.stats.weight_wait_s += idle
            self._maybe_report()
            return []
        finished = []
        outputs = self.engine.step()
        with self._lock:  # an external (NCCL) update may be recording its switch
            for output in outputs:
                if not output.finished:
                    continue
                for completion in output.outputs:
                    running = self._pop_episode(output.request_id, completion.index)
                    if running is not None:
                        finished += self._finish_turn(running, to_sample(completion))
        put = self._put(finished) if finished else []
        self.stats.busy_s += time.monotonic() - now
        self._maybe_report()
        return put

    # -- admission --------------------------------------------------------------------------
    def _admit(self) -> None:
        free = self.config.groups_in_flight - len(self._groups)
        if self._admit_limit is not None:
            free = min(
                free, self._admit_limit - self.stats.groups - self._sending - len(self._groups)
            )
        if free <= 0 or (self._refused and time.monotonic() < self._next_admit):
            return
        if self._groups and free < max(1, self.config.groups_in_flight // 4):
            return  # ask for leases a quarter of the engine at a time: fewer round trips
        buffer_version, leases = self.buffer.reserve(free)
        self._refused = len(leases) < free
        if self._refused:
            # Room comes back as the learner steps (every ~0.1-1 s): asking again at every
            # engine step would only load the gate, which shares the learner's process.
            self._next_admit = time.monotonic() + _ADMIT_RETRY_S
        if leases and self._follower is not None and buffer_version > self.version:
            # New groups start on the newest policy: admission control counts them from
            # the buffer's version, so starting them on older weights would make them
            # staler than the bound it keeps. Not here yet: the leases go back.
            self._follower.announce(buffer_version)
            self._take_weights()
            if self.version < buffer_version:
                self._send_later(lambda: self._put_channel.release(leases) or [], 0)
                return
        for lease in leases:
            prompt = next(self._prompts)
            group = _Group(uuid.uuid4().hex, prompt, lease)
            prompt_ids = render_prompt(self.tokenizer, prompt.messages)
            group.episodes = [
                _Running(group, Episode(prompt, prompt_ids)) for _ in range(self.config.group_size)
            ]
            self._submit(group.episodes)
            self._groups.append(group)

    def _submit(self, episodes: list[_Running]) -> None:
        """Send the next turn of `episodes`, which share their context, to the engine.

        A group's first turn is one request for all its episodes (n = group_size): vLLM
        processes the prompt once, and per-request overhead dominates short replies.
        Later turns of multi-turn episodes diverge and go one request each.
        """
        from vllm import TokensPrompt

        first = episodes[0]
        context = first.episode.prompt_token_ids + first.episode.token_ids
        self.stats.prompt_tokens += len(context)  # one request, however many episodes
        budget = min(self.config.sampling.max_tokens, self.max_model_len - len(context))
        request_id = f"{first.group.group_id}.{id(first)}.{first.turn}"
        for index, running in enumerate(episodes):
            # vLLM names the requests of n > 1 samples "<index>_<request id>".
            running.request_id = request_id if len(episodes) == 1 else f"{index}_{request_id}"
            running.turn_version = self.version
            running.switches = []
            self._running[running.request_id] = running
        params = self._sampling_params(budget, len(episodes))
        self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=context), params)

    def _pop_episode(self, request_id: str, index: int) -> _Running | None:
        """The episode a finished completion belongs to (keys as `_submit` made them; a
        request id never holds "_")."""
        return self._running.pop(f"{index}_{request_id}", None) or self._running.pop(
            request_id, None
        )

    def _sampling_params(self, max_tokens: int, n: int) -> object:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sampling = self.config.sampling
        return SamplingParams(
            n=n,
            max_tokens=max_tokens,
            ignore_eos=sampling.ignore_eos,
            temperature=sampling.temperature,
            logprobs=0,  # the sampled token's own log-prob, no alternatives
            # Only finished turns come back (what LLM.generate asks for too): per-step
            # outputs of every running request would cost Python time each step.
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def _prompt_stream(self) -> Iterator[Prompt]:
        """Training prompts, an endless stream of this actor's own (seeded per actor)."""
        for draw in range(10**9):
            seed = int(np.random.SeedSequence([self.seed, draw]).generate_state(1)[0])
            yield from self.env.prompts(Split.TRAIN, _PROMPTS_PER_DRAW, seed)

    # -- episodes and groups ----------------------------------------------------------------
    def _finish_turn(self, running: _Running, sample: Sample) -> list[_Group]:
        """Record a finished turn; returns the episode's group if that completed it."""
        self.stats.tokens += len(sample.token_ids)
        running.versions += _turn_versions(
            len(sample.token_ids), running.turn_version, running.switches
        )
        episode = running.episode
        last_turn = running.turn == self.env.max_turns - 1
        goes_on = take_turn(episode, sample, self.env, self.tokenizer, last_turn=last_turn)
        if goes_on and out_of_room(episode, self.max_model_len):
            goes_on = False
            drop_trailing_context(episode)  # no turn follows it, and it may not fit
        # Environment tokens (not sampled) carry the version of the turn they follow.
        running.versions += [self.version] * (len(episode.token_ids) - len(running.versions))
        if goes_on:
            running.turn += 1
            self._submit([running])
            return []
        group = running.group
        episode.generation_s = time.monotonic() - group.started
        group.finished += 1
        return [group] if group.finished == len(group.episodes) else []

    def _put(self, finished: list[_Group]) -> list[RolloutGroup]:
        """Verify finished groups and send them to the buffer in the background; a group
        whose rewards are all equal is dropped instead when `skip_uniform_groups` is set
        (its lease is given back, counted as `dropped_uniform`).

        The engine goes on while a put travels (across a long link a round trip takes as
        long as many engine steps); at most `_PUTS_IN_FLIGHT` puts are outstanding, and
        what the buffer answered is counted as each comes back (`_collect_puts`).
        """
        rollouts = [self._rollout(group) for group in finished]
        keep = [
            not (self.config.skip_uniform_groups and len(set(rollout.rewards)) == 1)
            for rollout in rollouts
        ]
        kept = [r for r, k in zip(rollouts, keep, strict=True) if k]
        leases = [g.lease for g, k in zip(finished, keep, strict=True) if k]
        dropped = [g.lease for g, k in zip(finished, keep, strict=True) if not k]
        for group in finished:
            self._groups.remove(group)
        self.stats.uniform_groups += len(dropped)
        self._send_later(lambda: self._send(kept, leases, dropped), len(kept))
        return kept

    def _send_later(self, call: Callable[[], list], n_groups: int) -> None:
        """Run a gate call (a put, a release) on the put thread, in order."""
        if self._sender is None:
            self._sender = ThreadPoolExecutor(1, thread_name_prefix="relay-put")
            self._put_channel = self.buffer.channel("put")
        self._puts.append((self._sender.submit(call), n_groups))
        self._collect_puts(wait=len(self._puts) > _PUTS_IN_FLIGHT)

    def _send(self, kept: list[RolloutGroup], leases: list[str], dropped: list[str]) -> list:
        """On the put thread: store `kept`, give back `dropped`; the refused groups."""
        refused = self._put_channel.put(kept, leases).refused if kept else []
        if dropped:
            self._put_channel.release(dropped, reason="uniform")
        return refused

    def _collect_puts(self, wait: bool = False) -> None:
        """Count the puts that came back (all of them with `wait`); re-raise their errors."""
        while self._puts and (wait or self._puts[0][0].done()):
            future, n_kept = self._puts.popleft()
            refused = future.result()
            if refused:  # quarantined by the buffer, with the reason; the others were stored
                self.stats.errors += len(refused)
                self.stats.last_error = f"group {refused[-1][0]} refused: {refused[-1][1]}"[:500]
            self.stats.groups += n_kept - len(refused)
            wait = wait and len(self._puts) > _PUTS_IN_FLIGHT

    @property
    def _sending(self) -> int:
        """Groups handed to the put thread and not yet counted."""
        return sum(n for _, n in self._puts)

    def _rollout(self, group: _Group) -> RolloutGroup:
        completions = []
        for running in group.episodes:
            episode = running.episode
            verdict = self.env.verify(episode.prompt, episode.transcript)
            completions.append(
                Completion(
                    token_ids=np.array(episode.token_ids, np.int32),
                    behaviour_logprobs=np.array(episode.behaviour_logprobs, np.float32),
                    loss_mask=np.array(episode.loss_mask, np.bool_),
                    policy_versions=VersionRuns.from_per_token(running.versions),
                    reward=verdict.reward,
                    finish_reason=episode.finish_reason,
                    verifier_details=dict(verdict.details),
                    generation_s=episode.generation_s,
                )
            )
        return RolloutGroup(
            run_id=self.run_id,
            group_id=group.group_id,
            env_name=self.env.name,
            prompt_id=group.prompt.prompt_id,
            prompt_token_ids=np.array(group.episodes[0].episode.prompt_token_ids, np.int32),
            completions=completions,
            actor_id=self.actor_id,
            created_at=time.time(),
        )

    def _abandon_unfinished(self) -> None:
        """Stop: let the puts in flight finish, abort running requests, give back the
        leases of unfinished groups."""
        try:
            while self._puts:
                self._collect_puts(wait=True)
        except Exception as error:  # stopping anyway: say what was lost, stop cleanly
            self._puts.clear()
            self.stats.errors += 1
            self.stats.last_error = f"a put failed while stopping: {error}"[:500]
            log.warning("%s: %s", self.actor_id, self.stats.last_error)
        if self._sender is not None:
            self._sender.shutdown(wait=True)
            self._sender = None
        if self._follower is not None:
            self._follower.stop()
            self._follower = None
        if self._running:
            # The engine knows a group's first turn by its one request id (see _submit).
            self.engine.abort_request(list({key.split("_")[-1] for key in self._running}))
        self.buffer.release([g.lease for g in self._groups])
        self._running.clear()
        self._groups.clear()

    # -- weights ----------------------------------------------------------------------------
    def start_following(self) -> None:
        """Before generating: load the newest version the buffer has (waiting for the first
        publish). From then on a `_Follower` fetches each new version beside generation."""
        latest = self.weights.latest_version()
        if latest is None:
            latest = self.weights.wait_for_version(self.config.weight_timeout_s)
        if latest is None:
            raise WeightsUnavailable(
                f"{self.actor_id}: no weights were published within "
                f"{self.config.weight_timeout_s:g}s (actors.weight_timeout_s)"
            )
        # The buffer's version, not the weight source's newest: a transport holds a
        # version a moment before the learner bumps the buffer to it, and groups sampled
        # with it then would carry a version the learner has not reached.
        self._load(min(latest, self.buffer.version()))
        self._follower = _Follower(
            self.weights, self.buffer.version, self.config.weight_poll_s
        ).start(self.version)

    def _take_weights(self) -> None:
        """Load the newest version the follower has fetched, if it is newer than the
        engine's: in flight, or once the engine is drained. No I/O here: the loop never
        waits on the link for weights."""
        follower = self._follower
        if follower.error is not None:
            raise follower.error
        ready = follower.ready
        if ready is None or ready <= self.version:
            return
        if self.config.weight_updates == "drain" and self._running:
            return  # admission is paused until the running episodes finish
        if not follower.lock.acquire(blocking=False):
            return  # a newer version is being written into the fetched copy
        try:
            self._load(follower.ready)
        finally:
            follower.lock.release()

    @property
    def _pending_version(self) -> int | None:
        """A version newer than the loaded one, announced by the buffer: no group is
        admitted until it is loaded."""
        latest = None if self._follower is None else self._follower.latest
        return latest if latest is not None and latest > self.version else None

    def _load(self, version: int) -> None:
        """Load `version`, or the buffer's version if it was dropped from the transport
        meanwhile (the learner keeps only the newest few). The scheduler stays paused throughout, so
        no step runs on a half-loaded model."""
        with paused_engine(self.llm):
            for _ in range(_LOAD_ATTEMPTS):
                try:
                    loaded = load_chunks(
                        self.llm, self.weights.chunks(version),
                        timeout_s=self.config.weight_timeout_s, pause=False,
                    )  # fmt: skip
                    break
                except WeightsUnavailable as error:
                    log.info("%s: %s; loading the latest instead", self.actor_id, error)
                    version = self.buffer.version()  # never one the buffer has not reached
            else:
                raise WeightsUnavailable(
                    f"{self.actor_id}: weights kept changing under {_LOAD_ATTEMPTS} loads"
                )
            self.switch_version(version, loaded.progress, loaded.seconds)

    def switch_version(self, version: int, progress: dict[str, int], seconds: float) -> None:
        """Record that `version` was loaded when each running request had sampled
        `progress[request]` tokens (vLLM's request ids carry a suffix after a dash)."""
        with self._lock:
            for internal_id, sampled in progress.items():
                running = self._running.get(internal_id) or self._running.get(
                    internal_id.rsplit("-", 1)[0]
                )
                if running is not None:
                    running.switches.append((sampled, version))
            log.debug(
                "%s: now at policy version %d (was %d; %d running sequences continue)",
                self.actor_id, version, self.version, len(self._running),
            )  # fmt: skip
            self.version = version
            self.stats.weight_loads += 1
            self.stats.weight_load_s += seconds

    # -- health -----------------------------------------------------------------------------
    def _maybe_report(self) -> None:
        if time.monotonic() >= self._next_report:
            self.report()
            self._next_report = time.monotonic() + self.config.metrics_every_s

    def health(self) -> dict[str, float | int | str]:
        """Throughput, version lag and idleness since this worker started."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        stats = self.stats
        return {
            "version": self.version,
            "version_lag": max(0, self.buffer.version() - self.version),
            "groups": stats.groups,
            "tokens": stats.tokens,
            "tokens_per_s": stats.tokens / elapsed,
            "groups_per_s": stats.groups / elapsed,
            "idle_fraction": stats.idle_s / max(stats.idle_s + stats.busy_s, 1e-9),
            "busy_s": stats.busy_s,
            "idle_s": stats.idle_s,
            "admission_wait_s": stats.admission_wait_s,
            "prompt_tokens": stats.prompt_tokens,
            "uniform_groups": stats.uniform_groups,
            "weight_loads": stats.weight_loads,
            "weight_load_s": stats.weight_load_s,
            "weight_wait_s": stats.weight_wait_s,
            **self._link_health(),
            "in_flight_groups": len(self._groups),
            "restarts": self.restarts,
            "errors": stats.errors,
            "last_error": stats.last_error,
        }

    def _link_health(self) -> dict[str, float | int]:
        """What crossed the link from the weight source: bytes/s, the last fetch."""
        link = getattr(self.weights, "link", None)
        if link is None:
            return {}
        return {
            "weight_bytes": link.bytes,
            "weight_bytes_per_s": link.bytes_per_s,
            "weight_full_fetches": link.full_fetches,
            "weight_delta_fetches": link.delta_fetches,
            "last_weight_fetch_s": link.last_fetch_s,
            "last_weight_latency_s": link.last_latency_s,
            "last_weight_at": link.last_at,
        }

    def report(self) -> None:
        """Write `health()` to the buffer (the dashboard's per-actor table)."""
        self.buffer.set_health(self.health())


class _Follower:
    """Follows the learner's versions on a thread of its own: reads the buffer's version
    every `poll_s` and fetches each newer one into the weight source's local copy, so the
    actor's loop loads what is ready and never waits on the link for weights."""

    def __init__(self, weights: WeightSource, version: Callable[[], int], poll_s: float):
        self.weights = weights
        self.version = version
        self.poll_s = poll_s
        self.latest: int | None = None
        """The newest version the buffer announced."""
        self.ready: int | None = None
        """The newest version fetched and ready to load."""
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        """Held while the source's copy changes (a fetch) or is read (a load)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay-weights", daemon=True)

    def start(self, loaded: int) -> _Follower:
        self.latest = self.ready = loaded
        self._thread.start()
        return self

    def announce(self, version: int) -> None:
        """A version the caller learned of (a reservation's answer)."""
        self.latest = max(version, self.latest or version)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                latest = self.version()
                self.announce(latest)
                if latest > self.ready:
                    with self.lock:
                        self.weights.fetch(latest)
                    self.ready = latest
                    continue  # more may have come meanwhile
            except WeightsUnavailable as error:
                log.info("weights: %s; trying the latest again", error)
            except Exception as error:  # the actor's loop raises it
                self.error = error
                return
            self._stop.wait(self.poll_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _turn_versions(n_tokens: int, start: int, switches: list[tuple[int, int]]) -> list[int]:
    """Per-token versions of a turn of `n_tokens` that began at `start` and crossed `switches`."""
    versions = [start] * n_tokens
    for cut, version in switches:
        versions[min(cut, n_tokens) :] = [version] * (n_tokens - min(cut, n_tokens))
    return versions
