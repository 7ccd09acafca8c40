"""The vLLM engine wrapper: one place that knows how vLLM is built and asked for samples.

On CPU (tests, CI, laptops) vLLM's CPU build runs with its KV cache sized by
`VLLM_CPU_KVCACHE_SPACE`; on GPU the same call uses CUDA with `gpu_memory_utilization`
and tensor parallelism. Sampled log-probabilities are those of the distribution the
token was drawn from, softmax(logits / temperature) (vLLM's `processed_logprobs`): the
behaviour policy μ that importance weights divide by, which the learner scores the same way.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from actors.config import EngineConfig
from weights.engine import WORKER_EXTENSION

if TYPE_CHECKING:
    from vllm import LLM

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One generated completion: sampled tokens, their log-probs under the sampler, why it ended."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    """"stop" or "length", as vLLM reports it."""


def build_llm(
    model_path: Path | str, config: EngineConfig, seed: int, cpu_cores: str | None = None
) -> LLM:
    """Start a vLLM engine for the Hugging Face model directory `model_path`; on CPU, on
    `cpu_cores` (VLLM_CPU_OMP_THREADS_BIND's form) when given."""
    import torch
    from vllm import LLM

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        # Read by vLLM's CPU worker when it sizes the KV cache.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config.kvcache_gib)
        if cpu_cores is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_cores
    in_process = on_cpu if config.in_process is None else config.in_process
    executor = {}
    if in_process:
        if config.tensor_parallel_size > 1:
            raise ValueError("engine.in_process needs engine.tensor_parallel_size 1")
        # Read when the LLM is built: the engine core then runs in this process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        executor["distributed_executor_backend"] = "uni"
    started = time.perf_counter()
    llm = LLM(
        model=str(model_path),
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        gpu_memory_utilization=config.gpu_memory_utilization,
        tensor_parallel_size=config.tensor_parallel_size,
        enforce_eager=config.enforce_eager,
        seed=seed,
        # μ is the tempered distribution tokens are sampled from, not the raw model's.
        logprobs_mode="processed_logprobs",
        # Adds relay_load_weights & co. to the workers, for weight updates in flight.
        worker_extension_cls=WORKER_EXTENSION,
        **executor,
    )
    log.info("vLLM engine for %s ready in %.1fs", model_path, time.perf_counter() - started)
    return llm


def generate(
    llm: LLM,
    prompt_token_ids: Sequence[Sequence[int]],
    max_tokens: Sequence[int],
    *,
    temperature: float,
    n: int = 1,
) -> list[list[Sample]]:
    """Sample `n` completions per prompt, each prompt with its own token budget.

    Randomness comes from the engine's seed: per-request seeds would make identical
    prompts (a group) sample identical completions.
    """
    from vllm import SamplingParams, TokensPrompt

    params = [
        # logprobs=0: the sampled token's own log-prob and no alternatives.
        SamplingParams(n=n, max_tokens=budget, temperature=temperature, logprobs=0)
        for budget in max_tokens
    ]
    prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_token_ids]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [[to_sample(completion) for completion in output.outputs] for output in outputs]


def to_sample(completion: object) -> Sample:
    token_ids = list(completion.token_ids)
    logprobs = [
        position[token].logprob
        for position, token in zip(completion.logprobs, token_ids, strict=True)
    ]
    return Sample(token_ids, logprobs, completion.text, str(completion.finish_reason))
