"""The DeepSpeed learner: recompute log π, advantages, an importance-corrected loss, step.

CPU (tests, laptops): fp32 over gloo; on GPU the same engine runs bf16 over NCCL. Any
number of data-parallel ranks: each rank trains on its own groups, the loss is normalised
by the global count of loss tokens, so N ranks give the update one rank would give on
the whole batch. Checkpoints and the Hugging Face export live here too; the loop around
`step` (sampling, publishing, committing) is learner/loop.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from buffer.schema import RolloutGroup
from learner.advantages import get_advantage
from learner.batching import TrainBatch, build_batch, padding_id
from learner.config import LearnerConfig, parse_cores
from learner.logprobs import gather_logprobs
from learner.losses import LossInputs, compute_loss, reference_kl

log = logging.getLogger(__name__)


class NonFiniteStep(RuntimeError):
    """A batch gave a non-finite loss or gradient: its update was skipped, the weights are
    those before it (less any earlier minibatch of the same batch), nothing to publish."""


class Learner:
    """A DeepSpeed engine around the policy, taking one optimizer step per batch of groups."""

    def __init__(
        self, model_path: str, config: LearnerConfig, *, rank: int = 0, world_size: int = 1,
        master_addr: str = "127.0.0.1", master_port: int = 29500, seed: int = 0,
        temperature: float = 1.0,
    ) -> None:  # fmt: skip
        """`temperature`: the actors' sampling temperature. The tokens were sampled from
        softmax(logits / T), so that is the policy the learner scores and trains."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 to score sampled tokens (got {temperature})")
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
        # An in-process vLLM engine in the same process (tests, evaluations) may already
        # hold a one-rank group; the learner then shares it and must not destroy it.
        self._owns_group = not dist.is_initialized()
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        if config.cpu_cores is not None:
            pin_process(parse_cores(config.cpu_cores))
        seed_everything(seed + rank)
        self.config = config
        self.temperature = temperature
        self.rank = rank
        self.world_size = world_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        self.reference = None
        if config.kl_coef > 0:
            self.reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
            self.reference.requires_grad_(False).eval()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": config.micro_batches,
            "gradient_clipping": config.max_grad_norm,
            "zero_optimization": {"stage": config.zero_stage},
            "bf16": {"enabled": config.precision == "bf16"},
            "steps_per_print": 10**9,
        }
        # DeepSpeed steps the schedule at every optimizer step and keeps it in checkpoints.
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_scale)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
        )
        if self.reference is not None:  # beside the policy, wherever DeepSpeed put it
            self.reference.to(self.engine.device)
        self.advantage = get_advantage(config.advantage)
        self.behaviour_gaps: list[float] = []
        """Per group of the last step: the largest mean |log π - log μ| of its fresh
        completions (NaN when none was fresh); see `LearnerConfig.max_behaviour_gap`."""
        self._gaps: list[float] = []
        self._measure_gaps = False

    def step(self, groups: Sequence[RolloutGroup], learner_version: int) -> dict[str, float]:
        """Train on this rank's `groups`: `update_epochs` passes over `minibatches` minibatches
        of whole groups, one optimizer step each; returns namespaced metrics.

        With more than one optimizer step per batch, log π_prox of every token is computed
        once, before the first update, and stays frozen for all of them (decoupled PPO's
        trust region). With one, π_prox is the policy being differentiated, detached.
        """
        started = time.perf_counter()
        self._gaps, self.behaviour_gaps = [], []
        lr = self.engine.get_lr()[0]  # of this batch's first optimizer step
        # Each minibatch is `micro_batches` forward/backward passes over parts of its
        # groups (None where there are more parts than groups).
        minibatches = [
            [self._build([groups[i] for i in micro], learner_version) for micro in parts]
            for parts in _split(len(groups), self.config.minibatches, self.config.micro_batches)
        ]
        if self.config.optimizer_steps_per_batch > 1:
            minibatches = [[self._with_proximal(micro) for micro in mb] for mb in minibatches]
        # Every rank divides by the same number, so the ranks' averaged gradients are the
        # token mean over the global minibatch.
        normalisers = [
            self.all_reduce_sum(sum(float(m.loss_mask.sum()) for m in mb if m is not None))
            / self.world_size
            for mb in minibatches
        ]
        parts = []
        self._measure_gaps = True  # on the first pass only: the weights the groups met
        for _ in range(self.config.update_epochs):
            for minibatch, normaliser in zip(minibatches, normalisers, strict=True):
                for micro in minibatch[:-1]:
                    parts.append(self._backward(micro, normaliser))
                    self.engine.step()  # DeepSpeed counts micro-steps: no update yet
                parts.append(self._backward(minibatch[-1], normaliser))
                problem = self._non_finite(parts[-len(minibatch) :])
                if problem:
                    self._skip_update()
                    raise NonFiniteStep(problem)
                self._scale_step(parts[-len(minibatch) :])
                self.engine.step()  # the minibatch's last micro-step: the optimizer steps
            self._measure_gaps = False
        self.behaviour_gaps = _per_group(self._gaps, groups)
        metrics = {f"learner/{k}": v for k, v in _combine(parts, self.config).items()}
        metrics["learner/lr"] = lr
        metrics["learner/step_s"] = time.perf_counter() - started
        return metrics

    def _build(self, groups: list[RolloutGroup], learner_version: int) -> TrainBatch | None:
        if not groups:
            return None
        batch = build_batch(
            groups, self.advantage, padding_id(self.tokenizer), learner_version,
            pack=self.config.pack_groups,
        )  # fmt: skip
        return batch.to(self.engine.device)

    def _backward(self, batch: TrainBatch | None, normaliser: float) -> dict[str, float]:
        """Forward and backward of one micro-batch; its loss is its share of the global mean."""
        if batch is None:
            # More micro-batches than rows: DeepSpeed still counts one backward per slot.
            self.engine.backward(_zero_loss(self.engine.module), scale_wrt_gas=False)
            return {}
        logprobs = self._logprobs(batch)
        if self._measure_gaps:
            self._gaps += _behaviour_gaps(logprobs.detach(), batch)
        proximal = batch.proximal_logprobs
        inputs = LossInputs(
            logprobs=logprobs,
            behaviour_logprobs=batch.behaviour_logprobs,
            advantages=batch.advantages,
            loss_mask=batch.loss_mask,
            # One optimizer step per batch: its own policy, detached, is the proximal one.
            proximal_logprobs=logprobs.detach() if proximal is None else proximal,
            staleness=batch.staleness,
            normaliser=normaliser,
        )
        out = compute_loss(self.config.loss, inputs)
        loss = out.loss
        metrics = {**out.metrics, "step_scale": out.step_scale}
        if not torch.isfinite(loss):
            # Its backward would poison every gradient; the step is skipped anyway.
            self.engine.backward(_zero_loss(self.engine.module), scale_wrt_gas=False)
            return {"non_finite_loss": 1.0}
        if self.reference is not None:
            with torch.no_grad():
                ref_logprobs = self._logprobs(batch, self.reference)
            kl = reference_kl(inputs, ref_logprobs)
            loss = loss + self.config.kl_coef * kl
            metrics["kl_reference"] = kl.item() * normaliser / max(metrics["tokens"], 1.0)
        # The loss is already normalised over the whole batch: no division by the GAS.
        self.engine.backward(loss, scale_wrt_gas=False)
        metrics["loss"] = loss.item()
        return metrics

    def _non_finite(self, parts: list[dict[str, float]]) -> str | None:
        """Why this minibatch's update must not be applied (on any rank), or None."""
        bad_loss = any("non_finite_loss" in part for part in parts)
        # safe_get_full_grad reads the whole gradient at any ZeRO stage, before the step.
        from deepspeed.utils import safe_get_full_grad

        bad_grad = not bad_loss and not all(
            bool(torch.isfinite(grad).all())
            for p in self.engine.module.parameters()
            if (grad := safe_get_full_grad(p)) is not None
        )
        if self.any_rank(bad_loss):
            return "non-finite loss"
        if self.any_rank(bad_grad):
            return "non-finite gradient"
        return None

    def _scale_step(self, parts: list[dict[str, float]]) -> None:
        """Shrink the coming optimizer step's learning rate by the loss's `step_scale`
        (token-weighted over the minibatch's micro-batches, averaged over ranks). The
        schedule sets the rate afresh after the step, so the scale lasts one step."""
        weighted = [(p.get("step_scale", 1.0), p.get("tokens", 0.0)) for p in parts]
        tokens = sum(t for _, t in weighted)
        local = sum(s * t for s, t in weighted) / tokens if tokens else 1.0
        scale = self.all_reduce_sum(local) / self.world_size
        if scale != 1.0:
            for group in self.engine.optimizer.param_groups:
                group["lr"] *= scale

    def _skip_update(self) -> None:
        """Finish the minibatch's micro-steps without the optimizer step: DeepSpeed's step
        at a boundary that is declared not to be one updates nothing (no optimizer, LR
        schedule or global step), and the gradients are dropped."""
        self.engine.set_gradient_accumulation_boundary(False)
        self.engine.step()
        self.engine.optimizer.zero_grad(set_to_none=True)
        self.engine.zero_grad()
        self.engine.set_gradient_accumulation_boundary(None)

    def _logprobs(self, batch: TrainBatch, model: nn.Module | None = None) -> torch.Tensor:
        """log π of every next token under `model` (the policy by default), at the actors'
        sampling temperature: [N, L-1]."""
        model = self.engine if model is None else model
        packed = batch.packed
        if packed is None:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            return gather_logprobs(logits[:, :-1] / self.temperature, batch.input_ids[:, 1:])
        logits = model(
            input_ids=packed.input_ids,
            attention_mask=packed.attention_mask,
            position_ids=packed.position_ids,
        ).logits
        scored = logits.reshape(-1, logits.shape[-1])[packed.sources] / self.temperature
        logprobs = torch.zeros(batch.loss_mask.shape, dtype=torch.float32, device=scored.device)
        index = (packed.rows, packed.columns)
        return logprobs.index_put(index, gather_logprobs(scored, packed.targets))

    def _with_proximal(self, batch: TrainBatch | None) -> TrainBatch | None:
        """The batch with log π_prox: the policy before this batch's first update."""
        if batch is None:
            return None
        with torch.no_grad():
            return dataclasses.replace(batch, proximal_logprobs=self._logprobs(batch))

    def all_reduce_sum(self, value: float) -> float:
        """Sum of `value` over the data-parallel ranks."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def any_rank(self, flag: bool) -> bool:
        """True if `flag` is true on any rank (e.g. a stop request), so all ranks agree."""
        return self.all_reduce_sum(float(flag)) > 0

    def close(self) -> None:
        """Leave the process group together: a rank that exits while its peers still hold
        connections can abort in gloo's threads at interpreter exit."""
        if self._owns_group and dist.is_initialized():
            if self.world_size > 1:
                dist.barrier()
            # DeepSpeed's own call: it also forgets the groups it cached (a clone of the
            # world group), which a later learner in this process would find destroyed.
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's parameters (tied ones once), for publishing to actors."""
        return {name: p.detach() for name, p in self.engine.module.named_parameters()}

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, directory: Path, tag: str, client_state: dict[str, Any]) -> None:
        """DeepSpeed checkpoint (model, optimizer, ZeRO shards) plus our state and RNGs.

        Every rank must call this (each saves its own optimizer shard).
        """
        state = {**client_state, "rng": rng_state()}
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=state)

    def load_checkpoint(self, directory: Path) -> dict[str, Any] | None:
        """Load the latest checkpoint under `directory`; its client state, or None if none."""
        if not (directory / "latest").is_file():
            return None
        path, state = self.engine.load_checkpoint(str(directory))
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
        if "rng" in state:
            set_rng_state(state["rng"])
        return state

    def export(self, out_dir: Path) -> Path:
        """Save the policy in Hugging Face format (what `from_pretrained` and `vllm serve` load)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        self.engine.module.save_pretrained(out_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)
        return out_dir


def _split(n_groups: int, minibatches: int, micro_batches: int) -> list[list[np.ndarray]]:
    """Group indices of each micro-batch of each minibatch, in order."""
    return [
        np.array_split(part, micro_batches)
        for part in np.array_split(np.arange(n_groups), minibatches)
    ]


def _behaviour_gaps(logprobs: torch.Tensor, batch: TrainBatch) -> list[float]:
    """Per row: mean |log π - log μ| over its loss tokens when it is fresh (staleness 0:
    sampled with the weights the learner holds now, so the two should agree), else NaN."""
    mask = batch.loss_mask.float()
    gap = ((logprobs - batch.behaviour_logprobs).abs() * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.where((batch.staleness == 0).cpu(), gap.cpu(), torch.nan).tolist()


def _per_group(row_gaps: list[float], groups: Sequence[RolloutGroup]) -> list[float]:
    """Rows are the groups' completions in order: the largest fresh gap of each group
    (NaN when it had no fresh completion)."""
    gaps, start = [], 0
    for group in groups:
        rows = np.array(row_gaps[start : start + len(group.completions)], dtype=np.float64)
        start += len(group.completions)
        gaps.append(float(np.nanmax(rows)) if np.isfinite(rows).any() else float("nan"))
    return gaps


def _zero_loss(module: torch.nn.Module) -> torch.Tensor:
    return sum(p.sum() for p in module.parameters()) * 0.0


def _combine(parts: list[dict[str, float]], config: LearnerConfig) -> dict[str, float]:
    """Micro-batch metrics -> batch metrics: maxima for *_max, token-weighted means over
    every pass otherwise; loss is the mean per optimizer step and tokens those of one pass."""
    parts = [p for p in parts if p]
    tokens = sum(p.get("tokens", 0.0) for p in parts)
    combined: dict[str, float] = {}
    for name in {name for p in parts for name in p}:
        values = [(p[name], p.get("tokens", 0.0)) for p in parts if name in p]
        if name == "loss":
            combined[name] = sum(v for v, _ in values) / config.optimizer_steps_per_batch
        elif name == "tokens":
            combined[name] = sum(v for v, _ in values) / config.update_epochs
        elif name.endswith("_max"):
            combined[name] = max(v for v, _ in values)
        elif tokens > 0:
            combined[name] = sum(v * w for v, w in values) / tokens
    combined["optimizer_steps"] = float(config.optimizer_steps_per_batch)
    return combined


def pin_process(cores: set[int]) -> None:
    """Every thread of this process, and those it starts later, on `cores` only. Linux's
    affinity is per thread, and threads inherit their creator's."""
    available = os.sched_getaffinity(0)
    if not cores <= available:
        raise ValueError(
            f"learner.cpu_cores: cores {sorted(cores - available)} are not available "
            f"here (this process may use {sorted(available)})"
        )
    for thread in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(thread), cores)
        except ProcessLookupError:  # the thread ended meanwhile
            continue
    log.info("learner threads pinned to cores %s", sorted(cores))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
