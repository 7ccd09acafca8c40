"""Held-out evaluation: play the environment's test prompts on vLLM and report accuracy."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from actors.episodes import SamplingConfig, run_episodes
from envs.base import Environment, Split
from relay.config_models import EvalConfig


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


def greedy_accuracy(
    model: object, tokenizer: object, env: Environment, prompts: list, max_tokens: int
) -> float:
    """Held-out accuracy of a `transformers` model by greedy decoding (single-turn tasks).

    What `relay run` reports during training, on the learner's own copy of the policy,
    without a second vLLM engine; the final figure comes from `evaluate` on vLLM.
    """
    import torch

    from actors.episodes import render_prompt
    from envs.base import Message
    from learner.batching import padding_id

    rows = [render_prompt(tokenizer, p.messages) for p in prompts]
    width = max(len(r) for r in rows)
    # Left padding, so that every row's next token is generated at the same position.
    pad_id = padding_id(tokenizer)
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
            max_new_tokens=max_tokens, pad_token_id=pad_id,
        )  # fmt: skip
    model.train(was_training)
    correct = 0
    for prompt, row in zip(prompts, out[:, width:], strict=True):
        reply = tokenizer.decode(row, skip_special_tokens=True)
        correct += env.verify(prompt, [Message("assistant", reply)]).correct
    return correct / len(prompts)
