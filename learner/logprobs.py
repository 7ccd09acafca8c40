"""Log-probabilities of given tokens under a causal LM: what the learner recomputes as π."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from learner.batching import pad_right


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position.

    logits: [B, T, V] float; targets: [B, T] long -> [B, T] float32.
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def completion_logprobs(
    model: nn.Module,
    prompt_ids: Sequence[int],
    completions: Sequence[Sequence[int]],
    temperature: float = 1.0,
) -> list[torch.Tensor]:
    """Log-prob of every completion token given the prompt and the tokens before it, under
    softmax(logits / temperature).

    Completions are right-padded into one batch; returns one [len(completion)] tensor each.
    """
    prompt_len = len(prompt_ids)
    # Padding is masked out of attention and never scored, so its id does not matter.
    input_ids, attention_mask = pad_right([[*prompt_ids, *c] for c in completions], pad_id=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    # Position t predicts token t + 1.
    logprobs = gather_logprobs(logits[:, :-1] / temperature, input_ids[:, 1:])
    return [
        logprobs[row, prompt_len - 1 : prompt_len - 1 + len(completion)]
        for row, completion in enumerate(completions)
    ]
