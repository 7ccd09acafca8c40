"""Learner throughput against a plain PyTorch loop, and the cost of publishing weights.

Same model, same batches, same loss (truncated IS) and optimizer (AdamW, grad clipping)
in the same process: the Relay learner (DeepSpeed engine, CPU: fp32, gloo, ZeRO-1) and a
plain loop (forward, loss, backward, clip, AdamW step). Rounds alternate between the two
so that both see the same machine state; medians of the rounds are reported. Also the
time one weight publish holds the learner (the CPU copy) and takes in the background
(Redis weight store on an embedded redis-server), for the tiny model and the one here.

    python benchmarks/learner_throughput.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from buffer.config import RedisServerConfig
from buffer.schema import Completion, FinishReason, RolloutGroup, VersionRuns
from buffer.server import RedisServer, free_port
from learner.advantages import get_advantage
from learner.batching import build_batch
from learner.config import LearnerConfig, TruncatedIS
from learner.logprobs import gather_logprobs
from learner.losses import LossInputs, compute_loss
from relay.tiny_model import TinyModelConfig, build_tiny_model
from weights.publisher import WeightPublisher
from weights.redis_store import RedisWeightStore

GROUPS, GROUP_SIZE, PROMPT, COMPLETION = 4, 8, 32, 224
MODELS = {
    "tiny": TinyModelConfig(),
    "small": TinyModelConfig(
        hidden_size=256, intermediate_size=768, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2,
    ),
}  # fmt: skip


def make_groups(n: int, vocab: int, seed: int) -> list[RolloutGroup]:
    rng = np.random.default_rng(seed)
    groups = []
    for i in range(n):
        completions = [
            Completion(
                token_ids=rng.integers(3, vocab, COMPLETION, dtype=np.int32),
                behaviour_logprobs=-rng.exponential(3.0, COMPLETION).astype(np.float32),
                loss_mask=np.ones(COMPLETION, np.bool_),
                policy_versions=VersionRuns.constant(0, COMPLETION),
                reward=float(j % 2),
                finish_reason=FinishReason.STOP,
            )
            for j in range(GROUP_SIZE)
        ]
        groups.append(
            RolloutGroup(
                "bench",
                f"g{seed}-{i}",
                "arithmetic",
                f"p{i}",
                rng.integers(3, vocab, PROMPT, dtype=np.int32),
                completions,
                "bench",
                0.0,
            )
        )
    return groups


class PlainLoop:
    """The same step without DeepSpeed: what the learner is measured against."""

    def __init__(self, model_path: Path, config: LearnerConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.pad_id = AutoTokenizer.from_pretrained(model_path).pad_token_id
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr)
        self.advantage = get_advantage(config.advantage)

    def step(self, groups: list[RolloutGroup]) -> None:
        batch = build_batch(groups, self.advantage, self.pad_id, 0)
        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logprobs = gather_logprobs(logits[:, :-1], batch.input_ids[:, 1:])
        inputs = LossInputs(
            logprobs, batch.behaviour_logprobs, batch.advantages, batch.loss_mask,
            proximal_logprobs=logprobs.detach(), staleness=batch.staleness,
        )  # fmt: skip
        compute_loss(self.config.loss, inputs).loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def tokens_of(groups: list[RolloutGroup]) -> int:
    return sum(int(np.sum(c.loss_mask)) for g in groups for c in g.completions)


def measure_model(name: str, shape: TinyModelConfig, work: Path, rounds: int, steps: int):
    from learner.trainer import Learner

    model_path = build_tiny_model(work / name, shape)
    config = LearnerConfig(lr=1e-4, loss=TruncatedIS())
    learner = Learner(str(model_path), config, master_port=free_port())
    plain = PlainLoop(model_path, config)
    vocab = learner.tokenizer.vocab_size
    batches = [make_groups(GROUPS, vocab, seed) for seed in range(steps)]
    learner.step(batches[0], 0)  # warm-up both (allocations, thread pools)
    plain.step(batches[0])
    relay_rates, plain_rates = [], []
    for _ in range(rounds):
        for rates, step in ((relay_rates, lambda b: learner.step(b, 0)), (plain_rates, plain.step)):
            started = time.perf_counter()
            for batch in batches:
                step(batch)
            rates.append(sum(map(tokens_of, batches)) / (time.perf_counter() - started))
    params = sum(p.numel() for p in learner.engine.module.parameters())
    publish = measure_publish(learner.state_dict(), work / f"redis-{name}")
    relay_tps, plain_tps = statistics.median(relay_rates), statistics.median(plain_rates)
    return {
        "parameters": params,
        "batch": f"{GROUPS} groups x {GROUP_SIZE} completions x {COMPLETION} tokens "
        f"(+{PROMPT} prompt tokens)",
        "relay_tokens_per_s": round(relay_tps, 1),
        "plain_torch_tokens_per_s": round(plain_tps, 1),
        "ratio_vs_plain_torch": round(relay_tps / plain_tps, 3),
        "relay_rounds": [round(r, 1) for r in relay_rates],
        "plain_rounds": [round(r, 1) for r in plain_rates],
        **publish,
    }


def measure_publish(params: dict[str, torch.Tensor], data_dir: Path, versions: int = 5) -> dict:
    with RedisServer(data_dir, RedisServerConfig()) as server:
        store = RedisWeightStore(server.client(), "bench")
        publisher = WeightPublisher([store])
        for version in range(1, versions + 1):
            publisher.publish(version, params)
            publisher.drain()
        publisher.close()
    timings = publisher.timings
    nbytes = sum(p.numel() * p.element_size() for p in params.values())
    return {
        "weights_mb": round(nbytes / 1e6, 2),
        "publish_blocking_ms": round(statistics.median(t.blocking_s for t in timings) * 1e3, 2),
        "publish_redis_ms": round(
            statistics.median(t.transports_s["redis"] for t in timings) * 1e3, 1
        ),
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(x - 0.2, [results[n]["relay_tokens_per_s"] for n in names], 0.4, label="Relay learner")
    ax.bar(
        x + 0.2, [results[n]["plain_torch_tokens_per_s"] for n in names], 0.4, label="plain torch"
    )
    ax.set_xticks(x, [f"{n} ({results[n]['parameters'] / 1e6:.1f}M)" for n in names])
    ax.set_ylabel("trained tokens/s")
    ax.legend()
    ax.set_title("Learner throughput on CPU (fp32)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="steps per round")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for name, shape in MODELS.items():
            results[name] = measure_model(name, shape, Path(work), args.rounds, args.steps)
            print(name, json.dumps(results[name], indent=1))
    report = {
        "machine": f"{platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learner.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.out / "learner.png")


if __name__ == "__main__":
    main()
