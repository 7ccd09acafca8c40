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
from weights.redis_store import RedisWeightSource, RedisWeightStore
from weights.wire import FrameEncoder


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
    store.publish_state(7, dict(original.named_parameters()))
    source = RedisWeightSource(store, chunk_mib=0.25)
    load_chunks(vllm_engine, source.chunks(store.latest_version()))
    assert worst_difference(vllm_engine, original, prompts) < LOGPROB_TOLERANCE

    # A remote actor's usual update: bfloat16 on the wire, a full frame once, then a delta
    # holding only what changed. The engine then samples exactly as the learner's policy in
    # the wire dtype would (the same weights, rounded to bfloat16, in float32 arithmetic).
    encoder = FrameEncoder(torch.bfloat16)
    store.publish(encoder.encode(8, dict(original.named_parameters())))
    load_chunks(vllm_engine, source.chunks(8))
    stepped = copy.deepcopy(original)
    with torch.no_grad():
        layer = stepped.model.layers[0].mlp.down_proj.weight
        layer[: layer.shape[0] // 4].add_(0.05 * torch.randn_like(layer[: layer.shape[0] // 4]))
    report = store.publish(encoder.encode(9, dict(stepped.named_parameters())))
    assert report.delta_bytes is not None and report.delta_bytes < report.bytes / 10
    load_chunks(vllm_engine, source.chunks(9))
    assert (source.link.full_fetches, source.link.delta_fetches) == (2, 1)
    rounded = copy.deepcopy(original)
    rounded.load_state_dict(
        {k: v.float() for k, v in source.mirror.tensors().items()}, strict=False
    )
    assert worst_difference(vllm_engine, rounded, prompts) < LOGPROB_TOLERANCE
    assert worst_difference(vllm_engine, original, prompts) > LOGPROB_TOLERANCE  # it moved
    update_engine_weights(vllm_engine, dict(original.named_parameters()))  # as other tests expect
