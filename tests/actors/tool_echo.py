"""A multi-turn test environment that answers every assistant message."""

from __future__ import annotations

from collections.abc import Sequence

from envs.base import EnvReply, Message, Prompt, Split, Verdict


class ToolEchoEnv:
    """A two-tool-call environment: it answers every assistant message until the turn limit."""

    name = "tool-echo"
    max_turns = 3

    def prompts(self, split: Split, count: int, seed: int) -> list[Prompt]:
        return [
            Prompt(f"echo:{i}", (Message("user", f"{i}+{i}="),), str(2 * i)) for i in range(count)
        ]

    def step(self, prompt: Prompt, transcript: Sequence[Message]) -> EnvReply:
        return EnvReply(done=False, message=Message("tool", f"<result>{len(transcript)}</result>"))

    def verify(self, prompt: Prompt, transcript: Sequence[Message]) -> Verdict:
        return Verdict(0.0, False, {"turns": len(transcript)})

    def demonstration(self, prompt: Prompt) -> str | None:
        return None
