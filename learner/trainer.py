"""The DeepSpeed learner's step: recompute log π, advantages, an importance-corrected loss.

CPU (tests, laptops): fp32, gloo, ZeRO stage from config; on GPU the same engine runs
bf16 over NCCL. Weight publishing, checkpoints and the loop around `step` come next.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from buffer.schema import RolloutGroup
from learner.advantages import get_advantage
from learner.batching import build_batch
from learner.logprobs import gather_logprobs
from learner.losses import LossConfig, LossInputs, TruncatedIS, compute_loss

log = logging.getLogger(__name__)


class LearnerConfig(BaseModel):
    """The learner: optimizer, DeepSpeed settings, and the objective."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(3e-4, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping."""
    zero_stage: Literal[0, 1, 2] = 1
    """DeepSpeed ZeRO stage."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32 on CPU (log-probs must match the actors'); bf16 on GPU."""
    advantage: Literal["grpo", "grpo_no_std", "rloo"] = "grpo"
    """Advantage estimator (learner/advantages.py)."""
    loss: LossConfig = Field(default_factory=TruncatedIS)
    """Off-policy correction (learner/losses.py); `type` selects it."""


class Learner:
    """A DeepSpeed engine around the policy, taking one optimizer step per batch of groups."""

    def __init__(
        self, model_path: str, config: LearnerConfig, *, rank: int = 0, world_size: int = 1,
        master_addr: str = "127.0.0.1", master_port: int = 29500,
    ) -> None:  # fmt: skip
        # DeepSpeed picks its accelerator when imported; without a GPU it must be told.
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # What a launcher (deepspeed, torchrun) would set; DeepSpeed reads them.
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank % max(1, torch.cuda.device_count())),
            WORLD_SIZE=str(world_size), MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
        )  # fmt: skip
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": config.max_grad_norm,
            "zero_optimization": {"stage": config.zero_stage},
            "bf16": {"enabled": config.precision == "bf16"},
        }
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.advantage = get_advantage(config.advantage)

    def step(self, groups: Sequence[RolloutGroup], learner_version: int) -> dict[str, float]:
        """One optimizer step on `groups`; returns namespaced metrics."""
        started = time.perf_counter()
        batch = build_batch(groups, self.advantage, self.tokenizer.pad_token_id, learner_version)
        logits = self.engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logprobs = gather_logprobs(logits[:, :-1], batch.input_ids[:, 1:])
        inputs = LossInputs(
            logprobs=logprobs,
            behaviour_logprobs=batch.behaviour_logprobs,
            advantages=batch.advantages,
            loss_mask=batch.loss_mask,
            # One optimizer step per batch: the proximal policy is the current one.
            proximal_logprobs=logprobs.detach(),
            staleness=batch.staleness,
        )
        out = compute_loss(self.config.loss, inputs)
        self.engine.backward(out.loss)
        self.engine.step()
        metrics = {f"learner/{name}": value for name, value in out.metrics.items()}
        metrics["learner/loss"] = out.loss.item()
        metrics["learner/step_s"] = time.perf_counter() - started
        return metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's parameters (tied ones once), for publishing to actors."""
        return dict(self.engine.module.named_parameters())
