"""The loop's GPU paths on one GPU: vLLM on CUDA taking new weights through frames, the
DeepSpeed learner in bf16, and a short `relay run` end to end. Skipped without CUDA;
`make gpu-check` runs them. NOT run by this project so far: its machines have no GPU."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_engine(tiny_model_dir: Path):
    from actors.config import EngineConfig
    from actors.engine import build_llm

    llm = build_llm(tiny_model_dir, EngineConfig(dtype="bfloat16", max_model_len=64), seed=0)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def test_cuda_engine_takes_a_bf16_frame_and_a_delta(gpu_engine, tiny_model_dir, redis_server):
    from actors.episodes import render_prompt
    from envs.arithmetic import ArithmeticConfig, ArithmeticEnv
    from envs.base import Split
    from tests.actors.logprob_check import worst_difference
    from weights.engine import load_chunks
    from weights.redis_store import RedisWeightSource, RedisWeightStore
    from weights.wire import FrameEncoder

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    stepped = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in stepped.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    store = RedisWeightStore(redis_server.client(), "gpu-smoke")
    source = RedisWeightSource(store)
    encoder = FrameEncoder(torch.bfloat16)
    store.publish(encoder.encode(1, dict(model.named_parameters())))
    load_chunks(gpu_engine, source.chunks(1))
    store.publish(encoder.encode(2, dict(stepped.named_parameters())))
    load_chunks(gpu_engine, source.chunks(2))
    env = ArithmeticEnv(ArithmeticConfig())
    prompts = [render_prompt(tokenizer, p.messages) for p in env.prompts(Split.TEST, 6, seed=9)]
    # bf16 engines and a bf16 reference differ by a few hundredths (learner.max_behaviour_gap).
    assert worst_difference(gpu_engine, stepped.float(), prompts) < 0.1
    assert worst_difference(gpu_engine, model.float(), prompts) > 0.1


def test_short_relay_run_on_the_gpu(tmp_path: Path, tiny_model_dir: Path) -> None:
    run = subprocess.run(
        [str(Path(sys.executable).parent / "relay"), "run", "-c", "configs/demo.yaml",
         f"run_dir={tmp_path / 'run'}", f"model.path={tiny_model_dir}", "learner.steps=20",
         "learner.precision=bf16", "engine.dtype=bfloat16", "actors.num_actors=1",
         "actors.cpu_cores=null", "actors.num_gpus=0.4", "eval.n_prompts=50",
         "eval.every_steps=0"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") >= 20
