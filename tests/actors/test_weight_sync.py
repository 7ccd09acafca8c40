"""New weights loaded into a running vLLM engine take effect, exactly (real vLLM, CPU build)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.engine import generate
from actors.episodes import render_prompt
from actors.weight_sync import chunks, pack_state_dict, update_engine_weights
from envs.arithmetic import ArithmeticConfig, ArithmeticEnv
from envs.base import Split
from learner.logprobs import completion_logprobs
from tests.actors.test_engine import LOGPROB_TOLERANCE


def worst_difference(llm: object, model: torch.nn.Module, prompts: list[list[int]]) -> float:
    """Largest |vLLM sampled log-prob - transformers log-prob| over fresh samples."""
    samples = generate(llm, prompts, [16] * len(prompts), temperature=1.0, n=4)
    worst = 0.0
    with torch.no_grad():
        for prompt_ids, group in zip(prompts, samples, strict=True):
            recomputed = completion_logprobs(model, prompt_ids, [s.token_ids for s in group])
            for sample, expected in zip(group, recomputed, strict=True):
                worst = max(worst, (torch.tensor(sample.logprobs) - expected).abs().max().item())
    return worst


@pytest.mark.slow
def test_running_engine_takes_new_weights_and_gives_them_back(
    vllm_engine: object, warm_model_dir: Path
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

    update_engine_weights(vllm_engine, dict(original.named_parameters()))
    assert worst_difference(vllm_engine, original, prompts) < LOGPROB_TOLERANCE


def test_state_dict_round_trips_through_the_wire_form() -> None:
    from actors.weight_sync import _unpack

    state = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1, 2], dtype=torch.int64),
    }
    packed = pack_state_dict(state)
    assert [(name, dtype, shape) for name, dtype, shape, _ in packed] == [
        ("a", "float32", [2, 3]),
        ("b", "int64", [2]),
    ]
    for name, tensor in _unpack(packed):
        assert torch.equal(tensor, state[name])


def test_chunks_respect_the_byte_budget() -> None:
    packed = [
        (f"t{i}", "uint8", [size], bytes(size)) for i, size in enumerate([40, 40, 30, 100, 10])
    ]
    sizes = [[len(item[3]) for item in chunk] for chunk in chunks(packed, max_bytes=80)]
    # 40 + 40 = 80 fits; 30 starts a new chunk; 100 exceeds the budget alone; 10 follows.
    assert sizes == [[40, 40], [30], [100], [10]]
