"""Run episodes of an environment on a vLLM engine, turn by turn, at the token level.

An episode's tokens are everything after the prompt: the policy's sampled replies (loss
mask True, with their behaviour log-probs) and, in multi-turn tasks, the environment's
messages rendered by the chat template (loss mask False, log-prob 0). All episodes of a
batch advance one turn per `generate` call, so the engine sees them together.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from actors.config import SamplingConfig
from actors.engine import Sample, generate
from buffer.schema import FinishReason
from envs.base import Environment, Message, Prompt, Verdict


@dataclass
class Episode:
    """One prompt's episode as tokens, with the transcript and the verifier's verdict."""

    prompt: Prompt
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    behaviour_logprobs: list[float] = field(default_factory=list)
    loss_mask: list[bool] = field(default_factory=list)
    transcript: list[Message] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.ABORT
    verdict: Verdict | None = None
    generation_s: float = 0.0
    """Seconds from the start of the batch until this episode's last turn came back."""


def render_prompt(tokenizer: object, messages: Sequence[Message]) -> list[int]:
    """Token ids of `messages` under the chat template, ending with the assistant's turn."""
    text = tokenizer.apply_chat_template(
        [m.as_dict() for m in messages], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def run_episodes(
    llm: object,
    tokenizer: object,
    env: Environment,
    prompts: Sequence[Prompt],
    sampling: SamplingConfig,
    *,
    max_model_len: int,
) -> list[Episode]:
    """Play every prompt to the end (answer, token budget or turn limit) and verify it."""
    started = time.perf_counter()
    episodes = [Episode(p, render_prompt(tokenizer, p.messages)) for p in prompts]
    active = list(episodes)
    for turn in range(env.max_turns):
        active = [e for e in active if not out_of_room(e, max_model_len)]
        if not active:
            break
        samples = generate(
            llm,
            [e.prompt_token_ids + e.token_ids for e in active],
            [min(sampling.max_tokens, max_model_len - _length(e)) for e in active],
            temperature=sampling.temperature,
        )
        still_running = []
        for episode, (sample,) in zip(active, samples, strict=True):
            if take_turn(episode, sample, env, tokenizer, last_turn=turn == env.max_turns - 1):
                still_running.append(episode)
            else:
                episode.generation_s = time.perf_counter() - started
        active = still_running
    for episode in episodes:
        episode.verdict = env.verify(episode.prompt, episode.transcript)
    return episodes


def take_turn(
    episode: Episode, sample: Sample, env: Environment, tokenizer: object, *, last_turn: bool
) -> bool:
    """Append the sampled reply and, if the episode goes on, the environment's answer."""
    episode.token_ids += sample.token_ids
    episode.behaviour_logprobs += sample.logprobs
    episode.loss_mask += [True] * len(sample.token_ids)
    episode.transcript.append(Message("assistant", _reply_text(tokenizer, sample.token_ids)))
    if sample.finish_reason == "length":
        episode.finish_reason = FinishReason.LENGTH
        return False
    reply = env.step(episode.prompt, episode.transcript)
    if reply.done:
        episode.finish_reason = FinishReason.STOP
        return False
    if last_turn or reply.message is None:
        episode.finish_reason = FinishReason.TURN_LIMIT
        return False
    env_tokens = _environment_tokens(tokenizer, episode, reply.message)
    episode.transcript.append(reply.message)
    episode.token_ids += env_tokens
    episode.behaviour_logprobs += [0.0] * len(env_tokens)
    episode.loss_mask += [False] * len(env_tokens)
    return True


def _environment_tokens(tokenizer: object, episode: Episode, message: Message) -> list[int]:
    # Render the whole conversation and keep what the environment's message added, so
    # any chat template (not only one that renders messages independently) works.
    before = list(episode.prompt.messages) + episode.transcript
    rendered_before = tokenizer.apply_chat_template(
        [m.as_dict() for m in before], add_generation_prompt=False, tokenize=False
    )
    rendered_after = tokenizer.apply_chat_template(
        [m.as_dict() for m in [*before, message]], add_generation_prompt=True, tokenize=False
    )
    suffix = rendered_after[len(rendered_before) :]
    return tokenizer(suffix, add_special_tokens=False)["input_ids"]


def _reply_text(tokenizer: object, token_ids: list[int]) -> str:
    return tokenizer.decode(token_ids, skip_special_tokens=True)


def drop_trailing_context(episode: Episode) -> None:
    """Remove the environment's tokens after the last sampled one: a message no turn
    answers trains nothing, and it may run past the engine's context window."""
    keep = len(episode.loss_mask)
    while keep and not episode.loss_mask[keep - 1]:
        keep -= 1
    del episode.token_ids[keep:], episode.behaviour_logprobs[keep:], episode.loss_mask[keep:]


def _length(episode: Episode) -> int:
    return len(episode.prompt_token_ids) + len(episode.token_ids)


def out_of_room(episode: Episode, max_model_len: int) -> bool:
    """True (and finish reason LENGTH) when the episode fills the context window."""
    if _length(episode) < max_model_len:
        return False
    episode.finish_reason = FinishReason.LENGTH
    return True
