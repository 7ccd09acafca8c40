"""Held-out evaluation: play the environment's test prompts on vLLM and report accuracy."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from actors.episodes import SamplingConfig, run_episodes
from envs.base import Environment, Split


class EvalConfig(BaseModel):
    """Held-out evaluation."""

    model_config = ConfigDict(extra="forbid")

    n_prompts: int = Field(500, gt=0)
    """Test-split prompts to evaluate on."""
    max_tokens: int = Field(16, gt=0)
    """Token budget per assistant turn."""
    temperature: float = Field(0.0, ge=0)
    """0 is greedy decoding."""
    seed: int = 1234
    """Chooses the test prompts; fixed so that runs are compared on the same ones."""


@dataclass(frozen=True)
class EvalReport:
    """Accuracy on held-out prompts, with a few transcripts to look at."""

    accuracy: float
    mean_reward: float
    n_prompts: int
    seconds: float
    examples: list[dict[str, str]] = field(default_factory=list)


def evaluate(
    llm: object, tokenizer: object, env: Environment, config: EvalConfig, *, max_model_len: int
) -> EvalReport:
    """Run the test prompts once each and score them."""
    started = time.perf_counter()
    prompts = env.prompts(Split.TEST, config.n_prompts, config.seed)
    sampling = SamplingConfig(temperature=config.temperature, max_tokens=config.max_tokens)
    episodes = run_episodes(llm, tokenizer, env, prompts, sampling, max_model_len=max_model_len)
    correct = sum(e.verdict.correct for e in episodes)
    rewards = [e.verdict.reward for e in episodes]
    examples = [
        {
            "prompt": e.prompt.messages[-1].content,
            "reply": " | ".join(m.content for m in e.transcript),
            "reference": e.prompt.reference,
            "correct": str(e.verdict.correct),
        }
        for e in episodes[:5]
    ]
    return EvalReport(
        accuracy=correct / len(episodes),
        mean_reward=sum(rewards) / len(rewards),
        n_prompts=len(episodes),
        seconds=time.perf_counter() - started,
        examples=examples,
    )
