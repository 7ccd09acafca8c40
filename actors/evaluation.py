"""Held-out evaluation on a vLLM engine: play the environment's test prompts, score them.

Here, beside the engine code, because an actor runs it too: the first actor scores the
starting policy on its own engine before it generates (`relay run`'s "before" figure).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from actors.config import EvalConfig
from actors.episodes import SamplingConfig, run_episodes
from envs.base import Environment, Split


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
