"""Settings of the warm start and the tiny model, apart from the code that uses them
(torch, transformers), so that loading a config imports none of it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TinyModelConfig(BaseModel):
    """Shape of the locally built Qwen2 policy (defaults: ~0.8M parameters)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    hidden_size: int = Field(128, gt=0)
    """Model width; width / heads is the head size, which vLLM's CPU attention needs >= 32."""
    intermediate_size: int = Field(384, gt=0)
    """Width of the MLP."""
    num_hidden_layers: int = Field(4, gt=0)
    """Transformer blocks."""
    num_attention_heads: int = Field(4, gt=0)
    """Query heads."""
    num_key_value_heads: int = Field(2, gt=0)
    """Key/value heads (grouped-query attention)."""
    max_position_embeddings: int = Field(256, gt=0)
    """Longest sequence (prompt + completion) in tokens."""
    seed: int = 0
    """Seed of the random initialisation."""


class WarmstartConfig(BaseModel):
    """Supervised warm start on the environment's demonstrations."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    steps: int = Field(800, gt=0)
    """Optimizer steps (the most, with `stop_at_accuracy`)."""
    stop_at_accuracy: float | None = Field(None, gt=0, le=1)
    """Stop as soon as greedy accuracy on held-out prompts reaches this, checked every
    `check_every_steps`. A short warm start sits where accuracy climbs fastest, so the
    step at which it reaches a level differs between CPUs (floating-point rounding): a
    target, unlike a step count, gives the same starting point everywhere. None: run
    all `steps`."""
    check_every_steps: int = Field(25, gt=0)
    """How often `stop_at_accuracy` is checked."""
    check_prompts: int = Field(200, gt=0)
    """Held-out prompts of each check (greedy, on the model being trained); drawn with
    another seed than the evaluation's."""
    batch_size: int = Field(64, gt=0)
    """Examples per step."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate (AdamW), reached after `warmup_steps`."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warm-up steps."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """After the warm-up: cosine decay to lr / 10 at the last step, or constant."""
    n_examples: int = Field(4000, gt=0)
    """Distinct training prompts drawn from the environment's train split."""
    out_path: Path = Path("models/tiny-warm")
    """Where the warm-started policy is saved (Hugging Face format)."""
