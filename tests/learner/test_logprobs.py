"""`gather_logprobs` against numbers computed by hand."""

from __future__ import annotations

import math

import torch

from learner.logprobs import gather_logprobs


def test_gather_logprobs_by_hand() -> None:
    # logits [0, ln 3] -> softmax [1/4, 3/4]; target 1 -> ln(3/4) = -0.28768...
    # logits [0, 0]    -> softmax [1/2, 1/2]; target 0 -> ln(1/2) = -0.69315...
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0]]])
    targets = torch.tensor([[1, 0]])
    expected = torch.tensor([[math.log(0.75), math.log(0.5)]])
    assert torch.allclose(gather_logprobs(logits, targets), expected, atol=1e-6)


def test_gather_logprobs_is_float32_for_half_inputs() -> None:
    logits = torch.zeros(1, 2, 4, dtype=torch.bfloat16)
    out = gather_logprobs(logits, torch.zeros(1, 2, dtype=torch.long))
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.full((1, 2), math.log(0.25)))
