"""Replay buffer throughput against the raw ceiling of the same Redis server.

For groups of 8 completions x {64, 512, 4096} tokens, on a fresh embedded redis-server
(AOF on, appendfsync everysec), this measures:

- put: `ReplayBuffer.put` of batches of groups (validation and encoding included);
- sample+ack: `sample(ack=previous_batch)`, a learner's loop: one round trip claims the
  next batch and acks the last (decoding and validation included);
- put through the gate: what a remote actor with a credential does (`GateClient.put`,
  the gate decoding and checking every group before it stores it);
- raw ceiling: a redis-py pipeline of SET (resp. GET + DEL) of the same encoded bytes,
  same batch size, same client;
- Redis memory per stored token and relative to the encoded payload.

    python benchmarks/buffer_throughput.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import redis

from buffer.codec import decode_groups, encode_group
from buffer.config import BufferConfig, RedisServerConfig
from buffer.credentials import Credentials, credential_url
from buffer.gate import Gate, GateClient
from buffer.replay_buffer import HeldBatch, ReplayBuffer
from buffer.schema import Completion, FinishReason, RolloutGroup, VersionRuns
from buffer.server import RedisServer, connect

SIZES = {"small": 64, "standard": 512, "large": 4096}
GROUP_SIZE = 8
BATCH = 16


def make_groups(n_groups: int, tokens: int, seed: int) -> list[RolloutGroup]:
    rng = np.random.default_rng(seed)

    def completion() -> Completion:
        return Completion(
            token_ids=rng.integers(0, 150_000, tokens, dtype=np.int32),
            behaviour_logprobs=-rng.exponential(1.0, tokens).astype(np.float32),
            loss_mask=np.ones(tokens, np.bool_),
            policy_versions=VersionRuns.constant(0, tokens),
            reward=float(rng.integers(0, 2)),
            finish_reason=FinishReason.STOP,
            verifier_details={"extracted": "42"},
            generation_s=1.0,
        )

    return [
        RolloutGroup(
            run_id="bench",
            group_id=f"g{seed}-{i}",
            env_name="arithmetic",
            prompt_id=f"p{i}",
            prompt_token_ids=rng.integers(0, 150_000, 128, dtype=np.int32),
            completions=[completion() for _ in range(GROUP_SIZE)],
            actor_id="bench",
            created_at=time.time(),
        )
        for i in range(n_groups)
    ]


def compact_aof(client: redis.Redis) -> None:
    """Rewrite the AOF now (the data set was just flushed) and wait until it is done.

    Automatic rewrites are off while measuring: a rewrite forks redis-server, and the
    copy-on-write page faults slow whichever phase it lands in by up to 4x (seen here).
    Every SET, script and DEL is still appended to the AOF, for the buffer and the raw
    ceiling alike.
    """
    client.bgrewriteaof()
    while True:
        persistence = client.info("persistence")
        if not (
            persistence["aof_rewrite_in_progress"]
            or persistence["aof_rewrite_scheduled"]
            or persistence["rdb_bgsave_in_progress"]
        ):
            return
        time.sleep(0.05)


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def timed_batches(batches: list, run: object) -> tuple[float, list[float]]:
    latencies = []
    started = time.perf_counter()
    for batch in batches:
        t0 = time.perf_counter()
        run(batch)
        latencies.append(time.perf_counter() - t0)
    return time.perf_counter() - started, latencies


def measure_size(server: RedisServer, name: str, tokens: int, n_groups: int) -> dict:
    client = server.client()
    client.flushall()
    compact_aof(client)
    groups = make_groups(n_groups, tokens, seed=tokens)
    encoded = [encode_group(g) for g in groups]
    payload_bytes = sum(len(e) for e in encoded)
    stored_tokens = sum(128 + GROUP_SIZE * tokens for _ in groups)
    config = BufferConfig(
        key_prefix=f"bench-{name}",
        admission_control=False,
        capacity_groups=10**7,
        capacity_mib=10**6,
    )
    buffer = ReplayBuffer(client, config)

    # Raw ceiling: the same bytes, SET then GET+DEL, pipelined in batches of the same size.
    keys = [f"raw:{i}" for i in range(n_groups)]

    def raw_set(indices: range) -> None:
        pipe = client.pipeline(transaction=False)
        for i in indices:
            pipe.set(keys[i], encoded[i])
        pipe.execute()

    def raw_get(indices: range) -> None:
        pipe = client.pipeline(transaction=False)
        for i in indices:
            pipe.get(keys[i])
            pipe.delete(keys[i])
        pipe.execute()

    ranges = [range(i, min(i + BATCH, n_groups)) for i in range(0, n_groups, BATCH)]
    # One untimed pass first, so redis-server's allocator already holds the pages for
    # both the raw ceiling and the buffer (the first writer would pay the page faults).
    for run in (raw_set, raw_get):
        timed_batches(ranges, run)
    raw_set_s, _ = timed_batches(ranges, raw_set)
    raw_get_s, _ = timed_batches(ranges, raw_get)

    # Relay: put, memory, sample+ack.
    before = used_memory(client)
    put_s, put_lat = timed_batches(
        [groups[i : i + BATCH] for i in range(0, n_groups, BATCH)],
        lambda batch: buffer.put(batch, "bench"),
    )
    memory = used_memory(client) - before
    # A learner's loop: each sample acks the previous batch in the same round trip.
    sample_lat = []
    started = time.perf_counter()
    taken = 0
    batch = None
    while taken < n_groups:
        t0 = time.perf_counter()
        batch = buffer.sample(min(BATCH, n_groups - taken), ack=batch)
        sample_lat.append(time.perf_counter() - t0)
        taken += len(batch.groups)
    buffer.ack(batch)
    sample_s = time.perf_counter() - started

    # Where sample+ack time goes: decoding and validating alone (batches of BATCH, as
    # `sample` does), and the buffer's transport alone (the round trip `sample` makes:
    # ack the previous batch, claim, read the bytes; no decoding).
    started = time.perf_counter()
    for i in range(0, n_groups, BATCH):
        decode_groups(encoded[i : i + BATCH])
    decode_us = 1e6 * (time.perf_counter() - started) / n_groups
    # A fresh prefix: the first pass's acks would refuse these group ids as retries.
    transport = ReplayBuffer(client, config.model_copy(update={"key_prefix": f"transport-{name}"}))
    transport.put(groups, "bench")
    started = time.perf_counter()
    taken = 0
    previous = None
    while taken < n_groups:
        token = uuid.uuid4().hex  # one per claim, as `sample` does
        _, reply, _, _ = transport._claim(BATCH, 1, token, "", previous)
        previous = HeldBatch(token, [entry_id.decode() for entry_id in reply[1::3]])
        taken += len(previous.entry_ids)
    transport.commit("bench", [previous])
    transport_s = time.perf_counter() - started

    # A remote actor's put: through the gate (a thread of this process, as beside the
    # learner), with a credential of its own; each group decoded and checked there.
    gated = ReplayBuffer(client, config.model_copy(update={"key_prefix": f"gate-{name}"}))
    gate = Gate(gated).start()
    password = Credentials(client, gated.config.key_prefix).create("bench")
    url = credential_url(server.url, gated.config.key_prefix, "bench", password)
    producer = GateClient(connect(url), gated.config, "bench", "bench")
    own = [dataclasses.replace(g, actor_id="bench") for g in groups]
    gate_put_s, _ = timed_batches(
        [own[i : i + BATCH] for i in range(0, n_groups, BATCH)], producer.put
    )
    gate.stop()

    mb = payload_bytes / 1e6
    return {
        "tokens_per_completion": tokens,
        "group_size": GROUP_SIZE,
        "groups": n_groups,
        "batch_groups": BATCH,
        "encoded_bytes_per_group": payload_bytes // n_groups,
        "put_groups_per_s": n_groups / put_s,
        "put_mb_per_s": mb / put_s,
        "put_latency_p50_ms": 1e3 * float(np.percentile(put_lat, 50)),
        "put_latency_p99_ms": 1e3 * float(np.percentile(put_lat, 99)),
        "sample_ack_groups_per_s": n_groups / sample_s,
        "sample_ack_mb_per_s": mb / sample_s,
        "sample_ack_latency_p50_ms": 1e3 * float(np.percentile(sample_lat, 50)),
        "sample_ack_latency_p99_ms": 1e3 * float(np.percentile(sample_lat, 99)),
        "decode_validate_us_per_group": decode_us,
        "sample_ack_transport_only_groups_per_s": n_groups / transport_s,
        "raw_set_groups_per_s": n_groups / raw_set_s,
        "raw_get_del_groups_per_s": n_groups / raw_get_s,
        "gate_put_groups_per_s": n_groups / gate_put_s,
        "ratio_put_vs_raw": raw_set_s / put_s,
        "ratio_gate_put_vs_raw": raw_set_s / gate_put_s,
        "ratio_sample_vs_raw": raw_get_s / sample_s,
        "ratio_sample_transport_only_vs_raw": raw_get_s / transport_s,
        "redis_bytes_per_stored_token": memory / stored_tokens,
        "redis_memory_vs_payload": memory / payload_bytes,
    }


def median_of(runs: list[dict]) -> dict:
    """Median of every figure over repeated runs; each run's ratios are kept too.

    Client and redis-server share two cores here, so single runs vary by up to ~1.5x.
    """
    merged = {key: float(np.median([run[key] for run in runs])) for key in runs[0]}
    for key in runs[0]:
        if key.startswith("ratio_"):
            merged[f"{key}_runs"] = [round(run[key], 3) for run in runs]
    return merged


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (relay_key, raw_key, title) in zip(
        axes,
        [
            ("put_mb_per_s", "raw_set_groups_per_s", "put vs raw SET"),
            ("sample_ack_mb_per_s", "raw_get_del_groups_per_s", "sample+ack vs raw GET+DEL"),
        ],
        strict=True,
    ):
        relay_mb = [results[n][relay_key] for n in names]
        raw_mb = [results[n][raw_key] * results[n]["encoded_bytes_per_group"] / 1e6 for n in names]
        ax.bar(x - 0.2, relay_mb, 0.4, label="Relay buffer")
        ax.bar(x + 0.2, raw_mb, 0.4, label="raw redis-py pipeline")
        ax.set_xticks(x, [f"{n}\n8x{int(results[n]['tokens_per_completion'])} tok" for n in names])
        ax.set_ylabel("MB/s")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--megabytes", type=float, default=150.0, help="payload per size")
    parser.add_argument(
        "--repeats", type=int, default=5, help="runs per size; medians are reported"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
        help="where redis-server keeps its AOF (default: tmpfs when there is one)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    with (
        tempfile.TemporaryDirectory(dir=args.data_dir) as data_dir,
        RedisServer(Path(data_dir), RedisServerConfig()) as server,
    ):
        version = server.client().info("server")["redis_version"]
        server.client().config_set("auto-aof-rewrite-percentage", 0)
        for name, tokens in SIZES.items():
            per_group = len(encode_group(make_groups(1, tokens, seed=0)[0]))
            n_groups = max(BATCH * 4, int(args.megabytes * 1e6 / per_group) // BATCH * BATCH)
            runs = [
                measure_size(server, f"{name}{r}", tokens, n_groups) for r in range(args.repeats)
            ]
            results[name] = median_of(runs)
            print(name, json.dumps(results[name], indent=1))
    report = {
        "benchmark": "buffer_throughput",
        "redis": (
            f"redis-server {version}, embedded, appendonly yes, appendfsync everysec, "
            "automatic AOF rewrites off while measuring (compacted between runs)"
        ),
        # The disk's fsync stalls hit raw and buffer phases at random (large puts varied
        # from 0.2 to 0.8 of raw on this machine's disk); on tmpfs every write is still
        # appended to the AOF, and what is compared is the work of client and server.
        "aof_dir": str(args.data_dir or tempfile.gettempdir()),
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "client": (
            f"redis-py {redis.__version__}"
            f"{' with hiredis' if redis.utils.HIREDIS_AVAILABLE else ''}, "
            "one connection, batches of 16 groups"
        ),
        "repeats": args.repeats,
        "statistic": "median over repeats (each ratio's runs listed beside it)",
        "sizes": results,
    }
    (args.out / "buffer.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.out / "buffer.png")


if __name__ == "__main__":
    main()
