"""New weights loaded into a running vLLM engine take effect, exactly (real vLLM, CPU build)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.episodes import render_prompt
from envs.arithmetic import ArithmeticConfig, ArithmeticEnv
from envs.base import Split
from tests.actors.logprob_check import LOGPROB_TOLERANCE, worst_difference
from weights.engine import load_chunks, update_engine_weights
from weights.redis_store import RedisWeightStore


@pytest.mark.slow
def test_running_engine_takes_new_weights_and_gives_them_back(
    vllm_engine: object, warm_model_dir: Path, redis_server: object
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(warm_model_dir)
    original = AutoModelForCausalLM.from_pretrained(warm_model_dir, dtype=torch.float32).eval()
    changed = copy.deepcopy(original)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in changed.parameters():  # tied embedding / LM head: perturbed once
            parameter.add_(0.05 * torch.randn_like(parameter))
    env = ArithmeticEnv(ArithmeticConfig())
    prompts = [render_prompt(tokenizer, p.messages) for p in env.prompts(Split.TEST, 6, seed=9)]

    update_engine_weights(vllm_engine, dict(changed.named_parameters()), chunk_mib=0.25)
    assert worst_difference(vllm_engine, changed, prompts) < LOGPROB_TOLERANCE
    # ...and the old weights no longer explain the samples (>10 nats was the stale-LM-head bug).
    assert worst_difference(vllm_engine, original, prompts) > 0.05

    # Back to the original weights, this time the way a remote actor gets them: from the
    # weight store in the buffer's Redis, streamed in small chunks.
    store = RedisWeightStore(redis_server.client(), "test-weight-sync", part_mib=0.1)
    store.publish(7, dict(original.named_parameters()))
    load_chunks(vllm_engine, store.stream(store.latest_version(), max_bytes=256 * 1024))
    assert worst_difference(vllm_engine, original, prompts) < LOGPROB_TOLERANCE
