"""Replay where generation is the bottleneck: `buffer.replay` R in {1, 2, 4}, time to a
fixed held-out accuracy.

The configuration is generation-bound on purpose: the demo with one actor (one vLLM
engine on core 0) and the learner on core 1, so that with R = 1 the learner waits for
rollouts most of its time. Every run has the same step schedule, batch and
`buffer.max_staleness` (4 by default, so that a group can be used again a few versions
after it was generated); only R changes. With R > 1 a batch takes the fresh groups
there are and fills the rest with replays, the freshest first.

Runs never pause to evaluate: the learner exports a snapshot every few steps with its
time, and afterwards one vLLM engine scores every snapshot greedily on the config's
held-out prompts (benchmarks/learning.py's machinery). Time starts when the first batch
reaches the learner (engine start-up, the same for every R, is reported apart).

Reported per R: seconds to the target accuracy (each seed, and the mean), the speedup
over R = 1, the learner's waiting share, steps/s, the replayed share of what it trained
on, and the final accuracy.

    python benchmarks/replay.py --out benchmarks/results          # about 25 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from learning import RELAY, CpuSampler, curve, read_records, score_snapshots, time_to, timing

REPLAYS = (1, 2, 4)
GENERATION_BOUND = [
    "actors.num_actors=1", 'actors.cpu_cores=["0"]', "learner.num_threads=1",
    "eval.every_steps=0", "eval.before=false", "dashboard.enabled=false",
]  # fmt: skip
"""The demo's config with one actor: generation, not the learner, is the bottleneck."""


def run(args: argparse.Namespace, replay: int, seed: int, run_dir: Path) -> dict:
    overrides = [
        *GENERATION_BOUND, f"model.path={args.model}", f"seed={seed}", f"run_dir={run_dir}",
        f"buffer.replay={replay}", f"buffer.max_staleness={args.max_staleness}",
        f"learner.time_limit_s={args.budget_s}",
        f"learner.snapshot_every_steps={args.snapshot_every}",
    ]  # fmt: skip
    with CpuSampler(run_dir / "cpu.jsonl"):
        subprocess.run(
            [RELAY, "run", "-c", str(args.config), *overrides], check=True,
            stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    return read_records(run_dir)


def replayed_share(record: dict) -> float:
    rows = record["metrics"]
    return statistics.mean(r.get("learner/replayed_fraction", 0.0) for r in rows)


def summarize(records: dict, seeds: list[int], target: float) -> dict:
    rows = {}
    for replay in REPLAYS:
        names = [f"R{replay}-{s}" for s in seeds]
        if not all(n in records for n in names):
            continue
        reached = [time_to(curve(records[n]), target) for n in names]
        timings = [timing(records[n]) for n in names]
        rows[f"R{replay}"] = {
            "seconds_to_target": reached,
            "mean_seconds_to_target": (
                statistics.mean(reached) if all(t is not None for t in reached) else None
            ),
            "learner_idle": [t["learner_idle"] for t in timings],
            "steps_per_s": [t["steps_per_s"] for t in timings],
            "replayed_share": [replayed_share(records[n]) for n in names],
            "final_accuracy": [t["final_accuracy"] for t in timings],
            "startup_wait_s": [t["startup_wait_s"] for t in timings],
        }
    base = rows.get("R1", {}).get("mean_seconds_to_target")
    for row in rows.values():
        mean = row["mean_seconds_to_target"]
        row["speedup_vs_R1"] = base / mean if base and mean else None
    return rows


def plot(records: dict, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    colors = dict(zip(REPLAYS, ("tab:grey", "tab:blue", "tab:green"), strict=True))
    for name, record in records.items():
        replay = int(name.split("-")[0][1:])
        t, accuracy = zip(*curve(record), strict=True)
        ax.plot(t, [100 * a for a in accuracy], color=colors[replay], alpha=0.8, label=name)
    ax.axhline(100 * target, color="grey", ls=":", label="target")
    ax.set_xlabel("training wall clock (s)")
    ax.set_ylabel("held-out accuracy (%, greedy, vLLM)")
    ax.set_title("buffer.replay R, one actor (generation-bound)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--model", default="models/tiny-warm", help="the warm-started policy")
    parser.add_argument("--target", type=float, default=0.8, help="held-out accuracy to reach")
    parser.add_argument("--budget-s", type=float, default=180.0)
    parser.add_argument("--max-staleness", type=int, default=4)
    parser.add_argument("--snapshot-every", type=int, default=25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-replay"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--reuse", action="store_true", help="keep runs already in --work")
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"no model at {args.model}: run `make demo` (or relay warmstart) first")

    records = {}
    for seed in args.seeds:  # R values alternate, so each sees the same machine state
        for replay in REPLAYS:
            name, run_dir = f"R{replay}-{seed}", args.work / f"R{replay}-{seed}"
            if not (args.reuse and (run_dir / "results.json").is_file()):
                subprocess.run(["rm", "-rf", str(run_dir)], check=True)
                started = time.monotonic()
                records[name] = run(args, replay, seed, run_dir)
                print(f"{name}: relay run took {time.monotonic() - started:.0f}s", flush=True)
            else:
                records[name] = read_records(run_dir)
    score_snapshots(records, args.config, args.model)
    summary = summarize(records, args.seeds, args.target)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, vLLM CPU build",
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": str(args.config),
        "overrides": GENERATION_BOUND,
        "max_staleness": args.max_staleness,
        "budget_s": args.budget_s,
        "target_accuracy": args.target,
        "seeds": args.seeds,
        "summary": summary,
        "curves": {name: curve(record) for name, record in records.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replay.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(records, args.target, args.out / "replay.png")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
