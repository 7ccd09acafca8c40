"""The rollout worker on a real vLLM engine and a real redis-server (no Ray here).

Groups land with the right tags; sampled log-probs are the policy's; a weight update in
the middle of generation splits sequences between two versions at the right token;
multi-turn episodes keep environment tokens out of the loss.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from actors.config import ActorConfig
from actors.episodes import SamplingConfig
from actors.rollout import RolloutWorker
from buffer.credentials import Credentials, credential_url
from buffer.gate import Gate, GateClient
from buffer.server import connect
from buffer.stats import read_stats
from buffer.telemetry import Telemetry
from envs.arithmetic import ArithmeticConfig, ArithmeticEnv
from envs.base import Verdict
from learner.logprobs import completion_logprobs
from tests.actors.logprob_check import LOGPROB_TOLERANCE
from tests.actors.tool_echo import ToolEchoEnv
from weights.engine import update_engine_weights
from weights.redis_store import RedisWeightSource, RedisWeightStore

pytestmark = pytest.mark.slow


_gates: list[Gate] = []


@pytest.fixture(autouse=True)
def _stop_gates() -> Iterator[None]:
    yield
    while _gates:
        _gates.pop().stop()


def worker(
    llm, tokenizer, env, buffer, weights=None, max_model_len: int = 128, **config
) -> RolloutWorker:
    """A worker putting into `buffer` through its gate, with credential `actor-test`."""
    _gates.append(Gate(buffer).start())
    password = Credentials(buffer.client, buffer.config.key_prefix).create("actor-test")
    server = buffer.client.connection_pool.connection_kwargs
    url = credential_url(f"redis://{server['host']}:{server['port']}/0",
                         buffer.config.key_prefix, "actor-test", password)  # fmt: skip
    producer = GateClient(connect(url), buffer.config, "actor-test", "actor-test")
    return RolloutWorker(
        llm, tokenizer, env, ActorConfig(**config), producer, weights,
        run_id="test", seed=5, max_model_len=max_model_len,
    )  # fmt: skip


def behaviour_error(model: torch.nn.Module, group, tokens: slice = slice(None)) -> float:
    """Largest |sampled - recomputed| log-prob over the loss tokens in `tokens`."""
    worst = 0.0
    with torch.no_grad():
        for completion in group.completions:
            (recomputed,) = completion_logprobs(
                model, group.prompt_token_ids.tolist(), [completion.token_ids.tolist()]
            )
            mask = torch.from_numpy(np.array(completion.loss_mask))[tokens]
            sampled = torch.from_numpy(np.array(completion.behaviour_logprobs))[tokens]
            worst = max(worst, (sampled - recomputed[tokens])[mask].abs().max().item())
    return worst


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of `model` with every weight moved by N(0, 0.05²): a clearly different policy."""
    changed = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in changed.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return changed


def store_at_version_0(buffer, redis_server, model) -> RedisWeightStore:
    """The buffer's weight store holding `model` as version 0."""
    store = RedisWeightStore(redis_server.client(), buffer.config.key_prefix)
    store.publish_state(0, dict(model.named_parameters()))
    return store


def test_groups_land_in_the_buffer_tagged_and_scored(
    vllm_engine, tokenizer, hf_model, make_buffer
) -> None:
    buffer = make_buffer(groups_per_version=4, max_staleness=1)
    env = ArithmeticEnv(ArithmeticConfig())
    rollout = worker(vllm_engine, tokenizer, env, buffer, group_size=4, groups_in_flight=3)
    stats = rollout.run(threading.Event(), max_groups=4)
    assert stats.groups == 4 and stats.tokens > 0
    # Admission control allows (0 + 1 + 1) x 4 = 8 groups; the leases of the groups
    # still running when the worker stopped were given back.
    assert int(buffer.client.hget(buffer.key("counters"), "admitted")) == stats.groups
    batch = buffer.sample(4)
    assert len(batch.groups) == 4
    for sampled in batch.groups:
        group = sampled.group
        assert group.actor_id == "actor-test" and group.env_name == "arithmetic"
        assert len(group.completions) == 4
        for completion in group.completions:
            assert completion.policy_versions.per_token().tolist() == [0] * completion.n_tokens
            assert completion.reward in (0.0, 1.0)
            assert all(completion.loss_mask)
        assert behaviour_error(hf_model, group) < LOGPROB_TOLERANCE
    health = Telemetry.beside(buffer).health()["actor-test"]
    assert (
        health["groups"] == stats.groups and health["version"] == 0 and health["tokens_per_s"] > 0
    )
    # Each group's prompt was prefilled once for its four completions (one request).
    prefilled = sum(len(g.group.prompt_token_ids) for g in batch.groups)
    assert prefilled <= health["prompt_tokens"] < 2 * prefilled
    assert health["admission_wait_s"] == 0.0


def test_time_waiting_for_admission_is_counted(vllm_engine, tokenizer, make_buffer) -> None:
    # Admission allows (version 0 + max_staleness 0 + 1) x 2 = 2 groups; the worker wants 4
    # and waits, idle, until it is stopped.
    buffer = make_buffer(groups_per_version=2, max_staleness=0)
    env = ArithmeticEnv(ArithmeticConfig())
    rollout = worker(vllm_engine, tokenizer, env, buffer, group_size=2, groups_in_flight=4)
    stop, done = threading.Event(), []
    running = threading.Thread(target=lambda: done.append(rollout.run(stop, max_groups=4)))
    running.start()
    deadline = time.monotonic() + 120
    while buffer.counter("put") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # both admitted groups are in: from here on it can only wait
    stop.set()
    running.join(30)
    (stats,) = done
    assert stats.groups == 2
    assert 0.5 < stats.admission_wait_s <= stats.idle_s


def test_weights_loaded_mid_generation_split_versions_at_the_right_token(
    vllm_engine, tokenizer, hf_model, make_buffer, redis_server
) -> None:
    buffer = make_buffer(admission_control=False)
    store = store_at_version_0(buffer, redis_server, hf_model)
    changed = perturbed(hf_model, seed=2)
    env = ArithmeticEnv(ArithmeticConfig())
    # 40 tokens per reply (sampling goes on past end-of-sequence): the switch after three
    # engine steps lands in the middle of every running sequence, although the engine
    # process runs several steps ahead of the outputs this process has seen.
    rollout = worker(
        vllm_engine, tokenizer, env, buffer, RedisWeightSource(store),
        group_size=4, groups_in_flight=2, sampling=SamplingConfig(max_tokens=40, ignore_eos=True),
        weight_poll_s=0.01,
    )  # fmt: skip
    try:
        rollout.start_following()
        assert rollout.version == 0
        put = []
        for _ in range(3):
            put += rollout.step()
        store.publish_state(1, dict(changed.named_parameters()))
        buffer.set_version(1)  # as the learner's publisher does, after the store
        while len(put) < 4:
            put += rollout.step()
    finally:
        rollout._abandon_unfinished()
        update_engine_weights(vllm_engine, dict(hf_model.named_parameters()))
    spanning = put[:2]  # admitted before the update
    for group in spanning:
        for completion in group.completions:
            runs = completion.policy_versions
            assert runs.versions.tolist() == [0, 1], runs
            assert 0 < runs.lengths[0] < 40
        # Tokens sampled before the switch are exactly the old policy's.
        cut = int(min(c.policy_versions.lengths[0] for c in group.completions))
        assert behaviour_error(hf_model, group, slice(0, cut)) < LOGPROB_TOLERANCE
    after = put[2:]  # admitted after the update: all version 1, the new policy's
    for group in after:
        assert all(set(c.policy_versions.per_token()) == {1} for c in group.completions)
        assert behaviour_error(changed, group) < LOGPROB_TOLERANCE
        assert behaviour_error(hf_model, group) > 0.05
    assert rollout.stats.weight_loads == 2


def test_a_version_in_the_store_is_loaded_only_once_the_buffer_has_it(
    vllm_engine, tokenizer, hf_model, make_buffer, redis_server
) -> None:
    """The learner writes weights before it bumps the buffer's version; an actor that
    loaded them in between would put groups of a version the learner has not reached
    (and have its credential revoked for it)."""
    buffer = make_buffer(admission_control=False)
    store = store_at_version_0(buffer, redis_server, hf_model)
    rollout = worker(vllm_engine, tokenizer, ArithmeticEnv(ArithmeticConfig()), buffer,
                     RedisWeightSource(store), group_size=2, groups_in_flight=1,
                     weight_poll_s=0.2)  # fmt: skip
    try:
        rollout.start_following()
        store.publish_state(1, dict(hf_model.named_parameters()))
        deadline = time.monotonic() + 1.0  # five of the follower's polls
        while time.monotonic() < deadline:
            rollout.step()
        assert (rollout.version, rollout._pending_version) == (0, None)
        buffer.set_version(1)
        deadline = time.monotonic() + 30
        while rollout.version == 0 and time.monotonic() < deadline:
            rollout.step()
        assert rollout.version == 1
    finally:
        rollout._abandon_unfinished()


class SlowLink(RedisWeightSource):
    """The weight store behind a slow link: every fetch after the first takes 1.5 s."""

    def fetch(self, version: int) -> int:
        if self.mirror.version is not None and version != self.mirror.version:
            time.sleep(1.5)
        return super().fetch(version)


def test_a_slow_weight_fetch_runs_beside_generation_and_holds_admission(
    vllm_engine, tokenizer, hf_model, make_buffer, redis_server
) -> None:
    buffer = make_buffer(admission_control=False)
    store = store_at_version_0(buffer, redis_server, hf_model)
    changed = perturbed(hf_model, seed=3)
    source = SlowLink(store)
    rollout = worker(
        vllm_engine, tokenizer, ArithmeticEnv(ArithmeticConfig()), buffer, source,
        group_size=2, groups_in_flight=2, sampling=SamplingConfig(max_tokens=24, ignore_eos=True),
        weight_poll_s=0.01,
    )  # fmt: skip
    try:
        rollout.start_following()
        put = []
        while len(put) < 2:
            put += rollout.step()
        store.publish_state(1, dict(changed.named_parameters()))
        buffer.set_version(1)  # as the learner's publisher does, after the store
        started = time.monotonic()
        admitted_during_fetch, at_start = set(), None
        while rollout.version == 0 and time.monotonic() - started < 60:
            put += rollout.step()
            if rollout._pending_version is not None:
                running = {g.group_id for g in rollout._groups}
                at_start = running if at_start is None else at_start
                admitted_during_fetch |= running
        fetch_s = time.monotonic() - started
        while len(put) < 6:
            put += rollout.step()
    finally:
        rollout._abandon_unfinished()
        update_engine_weights(vllm_engine, dict(hf_model.named_parameters()))
    assert rollout.version == 1 and fetch_s >= 1.5
    # While the fetch ran, the groups already running went on (and finished on v0), and
    # no group was admitted: the groups seen were those running when it started.
    assert rollout.stats.weight_wait_s > 0
    assert at_start is not None and admitted_during_fetch == at_start
    later = [g for g in put if g.group_id not in admitted_during_fetch][-2:]
    for group in later:  # admitted after the load: the new policy's, all of them
        assert all(set(c.policy_versions.per_token()) == {1} for c in group.completions)
        assert behaviour_error(changed, group) < LOGPROB_TOLERANCE


def test_multi_turn_groups_mask_environment_tokens(
    vllm_engine, tokenizer, hf_model, make_buffer
) -> None:
    buffer = make_buffer(admission_control=False)
    env = ToolEchoEnv()
    rollout = worker(
        vllm_engine, tokenizer, env, buffer, group_size=2, groups_in_flight=2,
        sampling=SamplingConfig(max_tokens=12),
    )  # fmt: skip
    rollout.run(threading.Event(), max_groups=2)
    groups = [g.group for g in buffer.sample(2).groups]
    episodes = [c for g in groups for c in g.completions]
    with_tools = [c for c in episodes if not all(c.loss_mask)]
    assert with_tools, "the environment answered no assistant turn"
    for completion in with_tools:
        env_tokens = ~np.array(completion.loss_mask)
        assert (np.array(completion.behaviour_logprobs)[env_tokens] == 0).all()
        assert "<result>" in tokenizer.decode(np.array(completion.token_ids)[env_tokens])
    for group in groups:
        assert behaviour_error(hf_model, group) < LOGPROB_TOLERANCE


def test_episodes_that_fill_the_context_window_stay_within_it(
    vllm_engine, tokenizer, make_buffer
) -> None:
    # The environment's answer to a turn may not fit the window; the episode then ends
    # there, without it, so the buffer (which refuses longer groups) takes every one.
    buffer = make_buffer(admission_control=False, max_sequence_tokens=64)
    rollout = worker(
        vllm_engine, tokenizer, ToolEchoEnv(), buffer, max_model_len=64, group_size=2,
        groups_in_flight=2, sampling=SamplingConfig(max_tokens=12),
    )  # fmt: skip
    rollout.run(threading.Event(), max_groups=2)
    assert read_stats(buffer).counters.get("quarantined", 0) == 0
    groups = [g.group for g in buffer.sample(2).groups]
    for group in groups:
        for completion in group.completions:
            assert len(group.prompt_token_ids) + completion.n_tokens <= 64
            assert completion.loss_mask[-1]  # it ends with a sampled token
    assert any(not all(c.loss_mask) for g in groups for c in g.completions)


def test_drain_mode_finishes_running_sequences_before_loading(
    vllm_engine, tokenizer, hf_model, make_buffer, redis_server
) -> None:
    buffer = make_buffer(admission_control=False)
    store = store_at_version_0(buffer, redis_server, hf_model)
    env = ArithmeticEnv(ArithmeticConfig())
    rollout = worker(
        vllm_engine, tokenizer, env, buffer, RedisWeightSource(store), weight_updates="drain",
        group_size=4, groups_in_flight=2, sampling=SamplingConfig(max_tokens=12),
        weight_poll_s=0.01,
    )  # fmt: skip
    try:
        rollout.start_following()
        put = []
        for _ in range(3):
            put += rollout.step()
        store.publish_state(1, dict(hf_model.named_parameters()))
        buffer.set_version(1)  # as the learner's publisher does, after the store
        while len(put) < 4:
            put += rollout.step()
    finally:
        rollout._abandon_unfinished()
    # The two groups running at the update finish on version 0; nothing new was admitted
    # until they had, then the next groups are all version 1.
    assert [sorted({int(v) for c in g.completions for v in c.policy_versions.versions})
            for g in put] == [[0], [0], [1], [1]]  # fmt: skip


class CoinEnv(ArithmeticEnv):
    """Arithmetic prompts, reward 1 for a reply of even length: groups of the tiny model's
    samples come out uniform or mixed at random."""

    def score(self, prompt, response):
        even = len(response) % 2 == 0
        return Verdict(float(even), even)


def test_uniform_groups_are_dropped_and_counted(vllm_engine, tokenizer, make_buffer) -> None:
    buffer = make_buffer(groups_per_version=64, max_staleness=0)
    rollout = worker(
        vllm_engine, tokenizer, CoinEnv(ArithmeticConfig()), buffer, group_size=2,
        groups_in_flight=8, skip_uniform_groups=True,
    )  # fmt: skip
    stats = rollout.run(threading.Event(), max_groups=6)
    assert stats.groups == 6 and stats.uniform_groups > 0
    counters = read_stats(buffer).counters
    assert counters["dropped_uniform"] == stats.uniform_groups
    assert counters["put"] == 6 and counters["admitted"] == 6  # dropped groups freed theirs
    for sampled in buffer.sample(6).groups:
        assert len(set(sampled.group.rewards)) == 2
