"""How far vLLM's sampled log-probs are from the learner's `transformers` recomputation."""

from __future__ import annotations

import torch

from actors.engine import generate
from learner.logprobs import completion_logprobs

# Both sides run in float32; the design card measured ~5e-7 between vLLM's CPU kernels and
# transformers (benchmarks/results/logprob_agreement.json: max 2.6e-6). 1e-3 nats leaves
# room for kernel differences while still catching any real mismatch (a wrong position,
# a stale weight, a temperature applied twice: >0.1).
LOGPROB_TOLERANCE = 1e-3


def worst_difference(
    llm: object,
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_tokens: int = 16,
    temperature: float = 1.0,
    scored_at: float | None = None,
) -> float:
    """Largest |vLLM sampled log-prob - transformers log-prob| over 4 fresh samples per
    prompt, sampled at `temperature` and recomputed at `scored_at` (default: the same)."""
    samples = generate(llm, prompts, [max_tokens] * len(prompts), temperature=temperature, n=4)
    scored_at = temperature if scored_at is None else scored_at
    worst = 0.0
    with torch.no_grad():
        for prompt_ids, group in zip(prompts, samples, strict=True):
            recomputed = completion_logprobs(
                model, prompt_ids, [s.token_ids for s in group], temperature=scored_at
            )
            for sample, expected in zip(group, recomputed, strict=True):
                assert len(sample.logprobs) == len(sample.token_ids) > 0
                worst = max(worst, (torch.tensor(sample.logprobs) - expected).abs().max().item())
    return worst
