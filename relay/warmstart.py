"""Supervised warm start: teach the policy the task's answer format so RL has signal.

Trains on the environment's demonstrations (prompt rendered by the chat template, then
the correct reply and the end-of-turn token); the loss counts only the reply tokens.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.episodes import render_prompt
from envs.base import Environment, Split
from learner.batching import pad_right, padding_id
from relay.config_models import WarmstartConfig
from relay.errors import RelayError
from relay.evaluate import greedy_accuracy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmstartReport:
    """What a warm start did."""

    steps: int
    examples: int
    seconds: float
    first_loss: float
    final_loss: float
    out_path: Path
    checked_accuracy: float | None = None
    """Greedy held-out accuracy at the last check (with `stop_at_accuracy`)."""


def build_examples(
    env: Environment, tokenizer: object, count: int, seed: int
) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) of `count` solved training prompts."""
    examples = []
    for prompt in env.prompts(Split.TRAIN, count, seed):
        reply = env.demonstration(prompt)
        if reply is None:
            raise RelayError(f"env {env.name} has no demonstrations, so it cannot be warm-started")
        prompt_ids = render_prompt(tokenizer, prompt.messages)
        reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        examples.append((prompt_ids + reply_ids + [tokenizer.eos_token_id], len(prompt_ids)))
    return examples


def warmstart(
    model_path: str,
    env: Environment,
    config: WarmstartConfig,
    seed: int,
    on_step: Callable[[int, float], None] = lambda step, loss: None,
) -> WarmstartReport:
    """Train `model_path` on demonstrations and save it to `config.out_path`."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.train()
    examples = build_examples(env, tokenizer, config.n_examples, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_scale(step, config))
    checks = env.prompts(Split.TEST, config.check_prompts, seed + 1)
    accuracy = None
    started = time.perf_counter()
    losses = []
    for step in range(config.steps):
        batch = [examples[i] for i in rng.integers(len(examples), size=config.batch_size)]
        input_ids, attention_mask, labels = _collate(batch, padding_id(tokenizer))
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        on_step(step + 1, losses[-1])
        if config.stop_at_accuracy is not None and (step + 1) % config.check_every_steps == 0:
            accuracy = greedy_accuracy(model, tokenizer, env, checks, _reply_tokens(examples))
            log.info("warm start step %d: held-out accuracy %.1f%%", step + 1, 100 * accuracy)
            if accuracy >= config.stop_at_accuracy:
                break
    seconds = time.perf_counter() - started
    config.out_path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(config.out_path)
    tokenizer.save_pretrained(config.out_path)
    log.info(
        "warm start: %d steps in %.0fs, loss %.3f -> %.3f", len(losses), seconds, losses[0],
        losses[-1],
    )  # fmt: skip
    return WarmstartReport(
        len(losses),
        len(examples),
        seconds,
        losses[0],
        float(np.mean(losses[-20:])),
        config.out_path,
        accuracy,
    )


def _reply_tokens(examples: list[tuple[list[int], int]]) -> int:
    """Enough new tokens for the longest demonstration's reply."""
    return max(len(ids) - prompt_len for ids, prompt_len in examples)


def _collate(
    batch: list[tuple[list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch: input ids, attention mask, and labels (-100 on prompt and padding)."""
    input_ids, attention_mask = pad_right([ids for ids, _ in batch], pad_id)
    labels = torch.full_like(input_ids, -100)
    for row, (ids, prompt_len) in enumerate(batch):
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
    return input_ids, attention_mask, labels


def _lr_scale(step: int, config: WarmstartConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
