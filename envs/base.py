"""The environment protocol: prompts for a split, a verifier, and an optional step function.

A single-turn environment gives a prompt and scores the one reply. A multi-turn environment
also answers each assistant message through `step` (a tool result, say) until the episode
ends with a final answer or reaches `max_turns`; its tokens are context, not policy output.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

Details = dict[str, "str | int | float | bool | None"]


class EnvError(ValueError):
    """An environment was misconfigured or given input it cannot use."""


def import_object(path: str, field: str) -> object:
    """The object an import path `package.module:name` (or `:Outer.inner`) names; an
    EnvError naming `field` when it cannot be imported."""
    module_name, _, attribute = path.partition(":")
    try:
        found: object = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as error:
        raise EnvError(f"{field} {path!r}: cannot import it ({error})") from None
    return found


class Split(str, enum.Enum):
    """Which prompts: training prompts or the held-out ones used for evaluation."""

    TRAIN = "train"
    TEST = "test"


@dataclass(frozen=True)
class Message:
    """One chat message; `role` is "system", "user", "assistant" or "tool"."""

    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Prompt:
    """A task instance: the messages the policy sees and the reference it is scored against."""

    prompt_id: str
    """Stable id: the same environment config and seed always yield the same ids."""
    messages: tuple[Message, ...]
    reference: str
    """The expected answer (for code, the task's name); never shown to the policy."""


@dataclass(frozen=True)
class Verdict:
    """The verifier's score of an episode."""

    reward: float
    correct: bool
    details: Details = field(default_factory=dict)


@dataclass(frozen=True)
class EnvReply:
    """What a multi-turn environment says after an assistant message."""

    done: bool
    """True when the assistant message ends the episode (it gave its answer)."""
    message: Message | None = None
    """The environment's answer (e.g. a tool result) when the episode continues."""


@runtime_checkable
class Environment(Protocol):
    """What actors and evaluation need from a task."""

    name: str
    max_turns: int
    """Assistant turns per episode: 1 for single-turn tasks."""

    def prompts(self, split: Split, count: int, seed: int) -> list[Prompt]:
        """`count` prompts of `split`, deterministic in `seed`; train and test never overlap."""
        ...

    def step(self, prompt: Prompt, transcript: Sequence[Message]) -> EnvReply:
        """React to the last assistant message of `transcript` (multi-turn only)."""
        ...

    def verify(self, prompt: Prompt, transcript: Sequence[Message]) -> Verdict:
        """Score a finished episode; `transcript` holds the messages after the prompt."""
        ...

    def demonstration(self, prompt: Prompt) -> str | None:
        """A correct reply for supervised warm start, or None when the task has none."""
        ...


class SingleTurnEnvironment:
    """Base for tasks scored on one reply: `step` always ends the episode."""

    name: str = ""
    max_turns: int = 1

    def step(self, prompt: Prompt, transcript: Sequence[Message]) -> EnvReply:
        return EnvReply(done=True)

    def verify(self, prompt: Prompt, transcript: Sequence[Message]) -> Verdict:
        return self.score(prompt, final_answer(transcript))

    def score(self, prompt: Prompt, response: str) -> Verdict:
        """Score the reply text against `prompt.reference`."""
        raise NotImplementedError

    def demonstration(self, prompt: Prompt) -> str | None:
        """The reference itself is a correct reply unless a task says otherwise."""
        return prompt.reference


def final_answer(transcript: Sequence[Message]) -> str:
    """The last assistant message of an episode ("" when the assistant said nothing)."""
    for message in reversed(transcript):
        if message.role == "assistant":
            return message.content
    return ""
