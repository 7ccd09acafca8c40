"""Staleness against corrections: every trained batch exactly k policy versions old.

For each k in {0, 2, 8, 32, 128} and each loss (none, tis, decoupled_ppo, seq_is, m2po,
seq_mis, vcpo), for every seed, the demo's task and recipe (warm-started tiny model,
16 groups x 8, lr 1e-4) train
for the same number of learner steps. Staleness is enforced by holding the actor's
weights back: the learner keeps its last k+1 versions, and before it generates the
batch for step s the actor's engine loads version max(0, v - k), where v is the
learner's version (every step publishes one). Generation and training alternate, so the
buffer holds only that batch when the learner samples it: a trained batch is exactly
min(k, v) versions old. This is checked from the buffer's own sampled-staleness
histogram, which the benchmark records per cell.

The pieces are Relay's own: the rollout worker on a vLLM engine, the Redis replay buffer
(real redis-server), the DeepSpeed learner. decoupled_ppo uses two minibatches per batch
(E=1, M=2: each sample is used once, as in the other cells, but the second optimizer
step sees a policy that moved away from the frozen π_prox, so the clip can act).

Two worker processes, one per core, share the cells (each runs its engine and learner
on its own core, alternating). Held-out accuracy: greedy on vLLM, 500 test prompts.

    python benchmarks/staleness.py --out benchmarks/results        # about 80 minutes
    (finished cells are kept in --work: run it again to go on, or to summarise them)
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STALENESS = (0, 2, 8, 32, 128)
LOSSES = ("none", "tis", "decoupled_ppo", "seq_is", "m2po", "seq_mis", "vcpo")


def learner_config(loss: str, steps: int, lr: float) -> dict:
    split = {"minibatches": 2} if loss == "decoupled_ppo" else {}
    return {
        "steps": steps, "batch_groups": 16, "lr": lr, "pack_groups": True, "num_threads": 1,
        "loss": {"type": loss}, **split,
    }  # fmt: skip


def run_cell(cell: dict, args: argparse.Namespace, shared: dict) -> dict:
    """Train one (k, loss, seed) cell; returns its curve and its staleness histogram."""
    from actors.config import ActorConfig, EvalConfig
    from actors.evaluation import evaluate
    from actors.rollout import RolloutWorker
    from buffer.config import BufferConfig
    from buffer.replay_buffer import ReplayBuffer
    from buffer.server import free_port
    from buffer.stats import read_stats
    from learner.config import LearnerConfig
    from learner.trainer import Learner
    from weights.engine import update_engine_weights

    k, loss, seed = cell["k"], cell["loss"], cell["seed"]
    llm, tokenizer, env, server = (
        shared["llm"],
        shared["tokenizer"],
        shared["env"],
        shared["server"],
    )
    buffer = ReplayBuffer(
        server.client(),
        BufferConfig(key_prefix=f"stale:{k}:{loss}:{seed}", max_staleness=k + 1,
                     admission_control=False),
    )  # fmt: skip
    config = LearnerConfig(**learner_config(loss, args.steps, args.lr))
    learner = Learner(args.model, config, master_port=free_port(), seed=seed)
    actor = ActorConfig(
        group_size=8, groups_in_flight=16,
        sampling={"temperature": 1.0, "max_tokens": 8},
    )  # fmt: skip
    worker = RolloutWorker(
        llm, tokenizer, env, actor, buffer, None, actor_id=f"actor-{seed}", run_id="stale",
        seed=seed, max_model_len=64,
    )  # fmt: skip
    heldout = EvalConfig(n_prompts=args.eval_prompts, max_tokens=8)

    def held_out_accuracy() -> float:
        update_engine_weights(llm, learner.state_dict())
        return evaluate(llm, tokenizer, env, heldout, max_model_len=64).accuracy

    versions = collections.OrderedDict({0: clone(learner.state_dict())})
    loaded, curve = None, [(0, held_out_accuracy())]
    stop, started = threading.Event(), time.monotonic()
    clip_fractions = []
    for step in range(1, args.steps + 1):
        version = step - 1  # every step publishes one version
        behaviour = max(0, version - k)
        if loaded != behaviour:
            load = update_engine_weights(llm, versions[behaviour])
            worker.switch_version(behaviour, {}, load.seconds)
            loaded = behaviour
        worker.run(stop, max_groups=step * config.batch_groups)
        batch = buffer.sample(config.batch_groups)
        assert len(batch.groups) == config.batch_groups, "the buffer holds one batch at a time"
        metrics = learner.step([g.group for g in batch.groups], version)
        buffer.ack(batch)
        clip_fractions.append(metrics.get("learner/clip_fraction", 0.0))
        buffer.set_version(step)
        versions[step] = clone(learner.state_dict())
        while len(versions) > k + 1:
            versions.popitem(last=False)
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, held_out_accuracy()))
            loaded = None  # the evaluation loaded the learner's weights into the engine
    stats = read_stats(buffer)
    learner.close()
    return {
        **cell,
        "steps": args.steps,
        "curve": curve,
        "final_accuracy": curve[-1][1],
        "sampled_staleness_histogram": {str(s): n for s, n in
                                        sorted(stats.sampled_staleness_histogram.items())},
        "clip_fraction_mean": statistics.mean(clip_fractions),
        "seconds": time.monotonic() - started,
    }  # fmt: skip


def clone(state: dict) -> dict:
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def worker_main(args: argparse.Namespace) -> None:
    """One worker process: its own engine and redis-server, its share of the cells."""
    import torch
    from transformers import AutoTokenizer

    from actors.engine import EngineConfig, build_llm
    from buffer.config import RedisServerConfig
    from buffer.server import RedisServer
    from envs.arithmetic import ArithmeticConfig, ArithmeticEnv

    torch.set_num_threads(1)
    cells = json.loads(args.cells)
    engine = EngineConfig(max_model_len=64, kvcache_gib=1)
    with (
        tempfile.TemporaryDirectory() as work,
        RedisServer(Path(work), RedisServerConfig()) as server,
    ):
        shared = {
            "llm": build_llm(args.model, engine, seed=0, cpu_cores=str(args.worker)),
            "tokenizer": AutoTokenizer.from_pretrained(args.model),
            "env": ArithmeticEnv(ArithmeticConfig(digits=2, operators=["+"])),
            "server": server,
        }
        with open(args.results, "a") as out:
            for cell in cells:
                result = run_cell(cell, args, shared)
                print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
                out.write(json.dumps(result) + "\n")
                out.flush()
        shared["llm"].llm_engine.engine_core.shutdown()


def summarize(results: list[dict]) -> dict:
    table = {}
    for k, loss in itertools.product(STALENESS, LOSSES):
        cells = [r for r in results if r["k"] == k and r["loss"] == loss]
        if not cells:
            continue
        finals = [c["final_accuracy"] for c in cells]
        # Steps at or after k train on batches exactly k versions old.
        hist = collections.Counter()
        for c in cells:
            hist.update({int(s): n for s, n in c["sampled_staleness_histogram"].items()})
        # The last three evaluations, a steadier figure than the final one alone.
        late = [statistics.mean(a for _, a in c["curve"][-3:]) for c in cells]
        table[f"{loss}@{k}"] = {
            "k": k, "loss": loss, "seeds": [c["seed"] for c in cells],
            "final_accuracy": finals,
            "mean": statistics.mean(finals),
            "spread": max(finals) - min(finals),
            "last_three_evals_mean": statistics.mean(late),
            "sampled_staleness_histogram": dict(sorted(hist.items())),
            "clip_fraction_mean": statistics.mean(c["clip_fraction_mean"] for c in cells),
        }  # fmt: skip
    return table


def against_on_policy(results: list[dict], table: dict) -> dict:
    """Per k, the best correction's mean final accuracy against on-policy training.

    On-policy is every cell at k = 0, whatever its loss: with fresh data every loss has
    the policy-gradient gradient, so they are samples of the same thing."""
    fresh = [r["final_accuracy"] for r in results if r["k"] == 0]
    if not fresh:
        return {}
    on_policy = statistics.mean(fresh)
    out: dict = {"on_policy_mean": on_policy, "on_policy_runs": len(fresh)}
    for k in sorted({r["k"] for r in results} - {0}):
        rows = [row for row in table.values() if row["k"] == k and row["loss"] != "none"]
        best = max(rows, key=lambda row: row["mean"])
        none = table.get(f"none@{k}")
        out[f"k={k}"] = {
            "best_loss": best["loss"],
            "best_mean": best["mean"],
            "points_below_on_policy": 100 * (on_policy - best["mean"]),
            "none_mean": none["mean"] if none else None,
        }
    return out


def plot(results: list[dict], table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(LOSSES)
    for i, loss in enumerate(LOSSES):
        rows = [table.get(f"{loss}@{k}") for k in STALENESS]
        xs = [j + (i - (len(LOSSES) - 1) / 2) * width for j, r in enumerate(rows) if r]
        means = [100 * r["mean"] for r in rows if r]
        errs = [[100 * (r["mean"] - min(r["final_accuracy"])) for r in rows if r],
                [100 * (max(r["final_accuracy"]) - r["mean"]) for r in rows if r]]  # fmt: skip
        left.bar(xs, means, width, yerr=errs, capsize=2, label=loss)
        ks = [k for k, r in zip(STALENESS, rows, strict=True) if r]
        right.plot([max(k, 0.5) for k in ks], means, marker="o", label=loss)
    left.set_xticks(range(len(STALENESS)), [f"k={k}" for k in STALENESS])
    left.set_ylabel("final held-out accuracy (%), range over seeds")
    left.legend(fontsize=7, ncol=4, loc="lower left")
    right.set_xscale("log", base=2)
    right.set_xticks([max(k, 0.5) for k in STALENESS], [str(k) for k in STALENESS])
    right.set_xlabel("versions of staleness k (every trained batch exactly k old)")
    right.set_ylabel("mean final held-out accuracy (%)")
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny-warm", help="the warm-started policy")
    parser.add_argument("--steps", type=int, default=400, help="learner steps per cell")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--staleness", type=int, nargs="+", default=list(STALENESS))
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-prompts", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2, help="processes, one core each")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, default=Path("runs/staleness"),
                        help="finished cells, kept so that a stopped run resumes")  # fmt: skip
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cells", help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker_main(args)
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"no model at {args.model}: run `make demo` (or relay warmstart) first")

    grid = itertools.product(args.seeds, args.staleness, args.losses)
    cells = [{"k": k, "loss": loss, "seed": seed} for seed, k, loss in grid]
    # Finished cells are kept in --work, so a run that stopped goes on where it was.
    args.work.mkdir(parents=True, exist_ok=True)
    results_file = args.work / "cells.jsonl"
    done = [json.loads(line) for line in results_file.read_text().splitlines()] if (
        results_file.is_file()) else []  # fmt: skip
    finished = {(r["k"], r["loss"], r["seed"]) for r in done if r["steps"] == args.steps}
    todo = [c for c in cells if (c["k"], c["loss"], c["seed"]) not in finished]
    print(f"{len(cells) - len(todo)} of {len(cells)} cells already in {results_file}")
    started = time.monotonic()
    shared = [str(a) for a in ("--model", args.model, "--steps", args.steps, "--lr", args.lr,
                               "--eval-every", args.eval_every,
                               "--eval-prompts", args.eval_prompts)]  # fmt: skip
    # The slowest cells (k = 128 holds 129 versions) first, dealt out in turn.
    todo.sort(key=lambda c: -c["k"])
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                *shared,
                "--worker",
                str(i),
                "--cells",
                json.dumps(todo[i :: args.workers]),
                "--results",
                str(results_file),
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for i in range(args.workers)
        if todo[i :: args.workers]
    ]
    if any(w.wait() for w in workers):
        sys.exit("a worker failed")
    wanted = {(c["k"], c["loss"], c["seed"]) for c in cells}
    results = [
        r
        for r in (json.loads(line) for line in results_file.read_text().splitlines())
        if (r["k"], r["loss"], r["seed"]) in wanted and r["steps"] == args.steps
    ]
    table = summarize(results)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, vLLM CPU build",
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "minutes_this_call": round((time.monotonic() - started) / 60, 1),
        "cell_minutes": round(sum(r["seconds"] for r in results) / 60, 1),
        "setup": {
            "model": args.model,
            "steps_per_cell": args.steps,
            "lr": args.lr,
            "learner": learner_config("tis", args.steps, args.lr),
            "decoupled_ppo": "update_epochs 1, minibatches 2",
            "enforcement": "actor loads version max(0, v - k) before each batch; "
            "generation and training alternate",
        },
        "table": table,
        "against_on_policy": against_on_policy(results, table),
        "cells": sorted(results, key=lambda r: (r["k"], r["loss"], r["seed"])),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "staleness.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, table, args.out / "staleness.png")
    for name, row in table.items():
        histogram = row["sampled_staleness_histogram"]
        at_k = histogram.get(row["k"], 0) / sum(histogram.values())
        print(f"{name:>18}: {100 * row['mean']:.1f} % (spread {100 * row['spread']:.1f}), "
              f"{at_k:.0%} of trained groups exactly {row['k']} versions stale")  # fmt: skip
    print(json.dumps(report["against_on_policy"], indent=1))


if __name__ == "__main__":
    main()
