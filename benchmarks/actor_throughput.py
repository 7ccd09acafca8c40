"""Rollout actor throughput against plain vLLM, and weight update latency per transport.

1. Tokens/s of one Relay rollout worker (step-driven engine, episodes, verification,
   encoding and `put` into a real redis-server included) versus `vllm.LLM.generate` on
   the same engine, prompts and sampling settings (fixed-length replies: end-of-sequence
   is ignored so both sample the same number of tokens). Rounds alternate; medians.
2. Weight update latency into a running engine for the tiny model and a ~110M-parameter
   model (random weights), per transport and wire dtype (float32, bfloat16; full frames,
   as a joining actor gets them): publish (encoding the frame and handing it over, on the
   learner's side) and fetch + load (the actor's side), in ms and GB/s, against a plain
   in-memory copy of the same bytes and one TCP stream over loopback, measured in the
   same run.

    python benchmarks/actor_throughput.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from actors.config import ActorConfig
from actors.engine import EngineConfig, build_llm
from actors.episodes import SamplingConfig, render_prompt
from actors.rollout import RolloutWorker
from buffer.config import BufferConfig, RedisServerConfig
from buffer.credentials import Credentials, credential_url
from buffer.gate import Gate, GateClient
from buffer.replay_buffer import ReplayBuffer
from buffer.server import RedisServer, connect
from envs.arithmetic import ArithmeticConfig, ArithmeticEnv
from relay.tiny_model import TinyModelConfig, build_tiny_model
from weights.engine import load_chunks
from weights.ray_store import RayObjectTransport, RayWeightSource
from weights.redis_store import RedisWeightSource, RedisWeightStore
from weights.wire import WIRE_DTYPES, FrameEncoder

GROUPS, GROUP_SIZE, TOKENS = 32, 8, 48
MODELS = {
    "tiny": TinyModelConfig(),
    "110M": TinyModelConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=12,
    ),
}  # fmt: skip


def throughput(llm, tokenizer, server: RedisServer, rounds: int) -> dict:
    from vllm import SamplingParams, TokensPrompt

    env = ArithmeticEnv(ArithmeticConfig())
    config = ActorConfig(
        group_size=GROUP_SIZE, groups_in_flight=GROUPS,
        sampling=SamplingConfig(max_tokens=TOKENS, ignore_eos=True),
    )  # fmt: skip
    relay_rates, plain_rates, plain_modes = [], [], []
    warmup = 2
    for round_ in range(rounds + warmup):  # the first rounds warm both up
        buffer = ReplayBuffer(
            server.client(), BufferConfig(key_prefix=f"bench{round_}", admission_control=False)
        )
        # As every actor does: through the learner's gate, with a credential of its own.
        gate = Gate(buffer).start()
        password = Credentials(buffer.client, buffer.config.key_prefix).create("bench")
        url = credential_url(server.url, buffer.config.key_prefix, "bench", password)
        producer = GateClient(connect(url), buffer.config, "bench", "bench")
        worker = RolloutWorker(
            llm, tokenizer, env, config, producer, None, run_id="bench", seed=round_,
            max_model_len=128,
        )  # fmt: skip
        prompts = list(itertools.islice(worker._prompt_stream(), GROUPS))
        started = time.perf_counter()
        stats = worker.run(threading.Event(), max_groups=GROUPS)
        relay_s = time.perf_counter() - started
        gate.stop()
        token_prompts = [
            TokensPrompt(prompt_token_ids=render_prompt(tokenizer, p.messages)) for p in prompts
        ]
        # Plain vLLM both ways: n completions per request, and one request per completion
        # (as the actor does, since multi-turn episodes diverge). The faster one is the bar.
        rates = []
        for n, copies in ((GROUP_SIZE, 1), (1, GROUP_SIZE)):
            params = SamplingParams(
                n=n, max_tokens=TOKENS, ignore_eos=True, temperature=1.0, logprobs=0
            )
            started = time.perf_counter()
            outputs = llm.generate(token_prompts * copies, params, use_tqdm=False)
            plain_s = time.perf_counter() - started
            rates.append(sum(len(c.token_ids) for o in outputs for c in o.outputs) / plain_s)
        if round_ >= warmup:
            relay_rates.append(stats.tokens / relay_s)
            plain_rates.append(max(rates))
            plain_modes.append("n=group_size" if rates[0] >= rates[1] else "one per completion")
    relay, plain = statistics.median(relay_rates), statistics.median(plain_rates)
    return {
        "workload": f"{GROUPS} groups x {GROUP_SIZE} completions x {TOKENS} tokens, "
        "all in flight at once",
        "relay_tokens_per_s": round(relay, 1),
        "vllm_generate_tokens_per_s": round(plain, 1),
        "ratio_vs_vllm": round(relay / plain, 3),
        "relay_rounds": [round(r, 1) for r in relay_rates],
        "vllm_rounds": [round(r, 1) for r in plain_rates],
        "vllm_faster_mode_per_round": plain_modes,
    }


def weight_updates(llm, model_dir: Path, server: RedisServer, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    params = dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())
    params = {name: p.detach() for name, p in params.items()}
    nbytes = sum(p.numel() * p.element_size() for p in params.values())
    # A plain memory copy of the same bytes into buffers allocated beforehand.
    targets = {name: torch.empty_like(p) for name, p in params.items()}
    copies = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        for name, p in params.items():
            targets[name].copy_(p)
        copies.append(time.perf_counter() - started)
    copies = copies[1:]
    copy_s = statistics.median(copies)
    results = {
        "parameters": sum(p.numel() for p in params.values()),
        "bytes": nbytes,
        "memory_copy_ms": round(copy_s * 1e3, 2),
        "memory_copy_gb_per_s": round(nbytes / copy_s / 1e9, 2),
    }
    results["loopback_tcp_gb_per_s"] = round(loopback_tcp_gb_per_s(nbytes), 3)
    store = RedisWeightStore(server.client(), f"bench-weights-{nbytes}")
    transports = {
        "redis": (store, RedisWeightSource(store)),
        "ray": (RayObjectTransport(f"bench-{nbytes}"), RayWeightSource(f"bench-{nbytes}")),
    }
    version = 0
    for wire in ("float32", "bfloat16"):
        for name, (transport, source) in transports.items():
            # Full frames only (a joining actor's case): no deltas.
            encoder = FrameEncoder(WIRE_DTYPES[wire], deltas=False)
            publish_s, load_s = [], []
            for _ in range(repeats):
                version += 1
                started = time.perf_counter()
                transport.publish(encoder.encode(version, params))
                publish_s.append(time.perf_counter() - started)
                load_s.append(load_chunks(llm, source.chunks(version)).seconds)
            publish_median, load_median = statistics.median(publish_s), statistics.median(load_s)
            total = publish_median + load_median
            results[name if wire == "float32" else f"{name}_bf16"] = {
                "wire_bytes": encoder.layout.nbytes,
                "publish_ms": round(publish_median * 1e3, 1),
                "fetch_and_load_ms": round(load_median * 1e3, 1),
                "end_to_end_gb_per_s": round(encoder.layout.nbytes / total / 1e9, 3),
                "model_gb_per_s": round(nbytes / total / 1e9, 3),
                "vs_memory_copy": round(copy_s / total, 4),
            }
    return results


def loopback_tcp_gb_per_s(nbytes: int) -> float:
    """One TCP stream over loopback, `nbytes` from a buffer into a buffer: the ceiling for
    any transport that crosses a socket (Redis both ways) on this machine."""
    import socket
    import threading

    source = torch.empty(nbytes, dtype=torch.uint8)
    target = torch.empty(nbytes, dtype=torch.uint8)
    out, into = memoryview(source.numpy()), memoryview(target.numpy())
    listener = socket.create_server(("127.0.0.1", 0))

    def receive() -> None:
        connection, _ = listener.accept()
        got = 0
        while got < nbytes:
            got += connection.recv_into(into[got:], min(nbytes - got, 4 << 20))
        connection.close()

    receiver = threading.Thread(target=receive)
    receiver.start()
    sender = socket.create_connection(listener.getsockname())
    started = time.perf_counter()
    sender.sendall(out)
    receiver.join()
    seconds = time.perf_counter() - started
    sender.close()
    listener.close()
    return nbytes / seconds / 1e9


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    tiny = results["tiny"]["throughput"]
    left.bar(["Relay actor", "vLLM generate"],
             [tiny["relay_tokens_per_s"], tiny["vllm_generate_tokens_per_s"]])  # fmt: skip
    left.set_ylabel("sampled tokens/s (tiny model, CPU)")
    names = list(results)
    for i, transport in enumerate(("redis", "ray")):
        right.bar([j + 0.35 * i for j in range(len(names))],
                  [results[n]["weights"][transport]["publish_ms"]
                   + results[n]["weights"][transport]["fetch_and_load_ms"] for n in names],
                  0.35, label=transport)  # fmt: skip
    right.set_xticks([j + 0.17 for j in range(len(names))], names)
    right.set_yscale("log")
    right.set_ylabel("weight update, publish + load (ms)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=1024**3)
    results = {}
    with (
        tempfile.TemporaryDirectory() as work,
        RedisServer(Path(work) / "redis", RedisServerConfig()) as server,
    ):
        for name in args.models:
            shape = MODELS[name]
            model_dir = build_tiny_model(Path(work) / name, shape)
            llm = build_llm(model_dir, EngineConfig(max_model_len=128, kvcache_gib=1), seed=0)
            entry = {"weights": weight_updates(llm, model_dir, server, args.repeats)}
            if name == "tiny":
                tokenizer = AutoTokenizer.from_pretrained(model_dir)
                entry["throughput"] = throughput(llm, tokenizer, server, args.rounds)
            results[name] = entry
            print(name, json.dumps(entry, indent=1), flush=True)
            llm.llm_engine.engine_core.shutdown()
            del llm
    ray.shutdown()
    report = {
        "machine": f"{platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, vLLM CPU build",
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "note": "Ray transport measured with publisher and actor in one process on one node "
        "(object store in shared memory); across nodes add the network transfer.",
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "actors.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.out / "actors.png")


if __name__ == "__main__":
    main()
