"""Replay where generation is the bottleneck: `buffer.replay` R in {1, 2, 4}, time to a
fixed held-out accuracy.

Four set-ups, each from its task's warm start:

- `copy` (configs/copy.yaml): replies of 3-64 digits, two engines that share both cores
  with the learner.
- `copy-one-actor`: the same with one engine on core 0 and the learner on core 1.
- `demo-one-actor` (configs/demo.yaml, one engine on core 0, the learner on core 1): the
  demo's 2-4-token answers are cheap to generate, so the learner waits little even with
  one actor. It shows what replay costs or gains where generation is not the bottleneck.
- `demo-slow-actor`: the same actor with 4 groups in flight instead of 32, so that its
  engine runs small batches and the learner waits for it most of the time: a stand-in
  for an actor that is slow or far away, the case replay is for.

Every run of a set-up has the same step schedule, batch and `buffer.max_staleness` (4 by
default, so that a group can be used again a few versions after it was generated); only
R changes. With R > 1 a batch takes the fresh groups there are and fills the rest with
replays, the freshest first.

Runs never pause to evaluate: the learner exports a snapshot every few steps with its
time, and afterwards one vLLM engine scores every snapshot greedily on the config's
held-out prompts (benchmarks/learning.py's machinery). Time starts when the first batch
reaches the learner (engine start-up, the same for every R, is reported apart).

Reported per set-up and R: seconds to the target accuracy (each seed, and the mean), the
speedup over R = 1, the learner's waiting share, steps/s, the replayed share of what it
trained on, and the final accuracy.

    python benchmarks/replay.py --out benchmarks/results          # about 50 minutes
    python benchmarks/replay.py --setups copy --reuse             # one set-up, keep runs
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
from dataclasses import dataclass
from pathlib import Path

from learning import RELAY, CpuSampler, curve, read_records, score_snapshots, time_to, timing

REPLAYS = (1, 2, 4)
NO_PAUSES = ["eval.every_steps=0", "eval.before=false", "dashboard.enabled=false"]
ONE_ACTOR = ["actors.num_actors=1", 'actors.cpu_cores=["0"]', "learner.num_threads=1"]


@dataclass(frozen=True)
class Setup:
    config: Path
    model: str
    overrides: list[str]
    target: float
    """The held-out accuracy whose time is measured."""
    budget_s: float
    """Each run's `learner.time_limit_s`."""


SETUPS = {
    "copy": Setup(Path("configs/copy.yaml"), "models/tiny-copy-warm", NO_PAUSES, 0.42, 240.0),
    "copy-one-actor": Setup(
        Path("configs/copy.yaml"), "models/tiny-copy-warm", [*ONE_ACTOR, *NO_PAUSES], 0.42, 240.0
    ),
    "demo-one-actor": Setup(
        Path("configs/demo.yaml"), "models/tiny-warm", [*ONE_ACTOR, *NO_PAUSES], 0.75, 240.0
    ),
    "demo-slow-actor": Setup(
        Path("configs/demo.yaml"),
        "models/tiny-warm",
        [*ONE_ACTOR, "actors.groups_in_flight=4", *NO_PAUSES],
        0.7,
        180.0,
    ),
}


def run(args: argparse.Namespace, setup: Setup, replay: int, seed: int, run_dir: Path) -> dict:
    overrides = [
        *setup.overrides, f"model.path={setup.model}", f"seed={seed}", f"run_dir={run_dir}",
        f"buffer.replay={replay}", f"buffer.max_staleness={args.max_staleness}",
        f"learner.time_limit_s={setup.budget_s}",
        f"learner.snapshot_every_steps={args.snapshot_every}",
    ]  # fmt: skip
    with CpuSampler(run_dir / "cpu.jsonl"):
        subprocess.run(
            [RELAY, "run", "-c", str(setup.config), *overrides], check=True,
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


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(results) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(12.8, 4 * rows), squeeze=False)
    colors = dict(zip(REPLAYS, ("tab:grey", "tab:blue", "tab:green"), strict=True))
    for ax in axes.flat[len(results) :]:
        ax.axis("off")
    for ax, (name, result) in zip(axes.flat, results.items(), strict=False):
        for run_name, points in result["curves"].items():
            replay = int(run_name.split("-")[0][1:])
            t, accuracy = zip(*points, strict=True)
            ax.plot(t, [100 * a for a in accuracy], color=colors[replay], alpha=0.8, label=run_name)
        ax.axhline(100 * result["target_accuracy"], color="grey", ls=":", label="target")
        idle = statistics.mean(result["summary"]["R1"]["learner_idle"])
        ax.set_title(f"{name}: buffer.replay R (learner idle {idle:.0%} at R = 1)", fontsize=10)
        ax.set_xlabel("training wall clock (s)")
        ax.set_ylabel("held-out accuracy (%, greedy, vLLM)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def measure(args: argparse.Namespace, name: str, setup: Setup) -> dict:
    if not (Path(setup.model) / "config.json").is_file():
        sys.exit(f"no model at {setup.model}: run `relay warmstart -c {setup.config}` first")
    records = {}
    for seed in args.seeds:  # R values alternate, so each sees the same machine state
        for replay in REPLAYS:
            run_name, run_dir = f"R{replay}-{seed}", args.work / name / f"R{replay}-{seed}"
            if not (args.reuse and (run_dir / "results.json").is_file()):
                subprocess.run(["rm", "-rf", str(run_dir)], check=True)
                started = time.monotonic()
                records[run_name] = run(args, setup, replay, seed, run_dir)
                print(f"{name} {run_name}: relay run took {time.monotonic() - started:.0f}s")
            else:
                records[run_name] = read_records(run_dir)
    score_snapshots(records, setup.config, setup.model)
    return {
        "config": str(setup.config),
        "model": setup.model,
        "overrides": setup.overrides,
        "budget_s": setup.budget_s,
        "target_accuracy": setup.target,
        "summary": summarize(records, args.seeds, setup.target),
        "curves": {run_name: curve(record) for run_name, record in records.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--max-staleness", type=int, default=4)
    parser.add_argument("--snapshot-every", type=int, default=25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-replay"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--reuse", action="store_true", help="keep runs already in --work")
    args = parser.parse_args()

    path = args.out / "replay.json"
    kept = json.loads(path.read_text()).get("setups", {}) if path.is_file() else {}
    results = {name: kept[name] for name in SETUPS if name in kept}  # the others' last run
    for name in args.setups:
        results[name] = measure(args, name, SETUPS[name])
        print(name, json.dumps(results[name]["summary"], indent=1), flush=True)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, vLLM CPU build",
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "max_staleness": args.max_staleness,
        "seeds": args.seeds,
        "setups": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.out / "replay.png")


if __name__ == "__main__":
    main()
