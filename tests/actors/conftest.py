"""Fixtures of the actor tests: the warm model in `transformers` and its tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


@pytest.fixture(scope="module")
def hf_model(warm_model_dir: Path) -> torch.nn.Module:
    """The policy the session's vLLM engine serves, as the learner sees it (float32)."""
    return AutoModelForCausalLM.from_pretrained(warm_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(warm_model_dir: Path) -> object:
    return AutoTokenizer.from_pretrained(warm_model_dir)
