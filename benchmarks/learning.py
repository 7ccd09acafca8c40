"""Asynchronous against synchronous RL: held-out accuracy against wall-clock seconds.

One config (the demo's by default) runs as `relay run` in `mode=async` and in `mode=sync`
(the on-policy schedule on the same code, actors and cores: buffer.max_staleness 0,
admission control, actors drain before each load), for the same training budget
(`learner.time_limit_s`), for every seed. Runs never pause to evaluate: the learner
exports a snapshot every few steps with its time (`learner.snapshot_every_steps`), and
afterwards one vLLM engine scores every snapshot greedily on the same held-out prompts
(`eval.n_prompts`, 500 in the demo).

Reported, from the runs' own records (metrics.jsonl, results.json):
- the accuracy sync ends at (mean over seeds of its last snapshot), and the time each
  mode first reaches it, with the speedup;
- Tg and Tt per step, measured in sync, where they do not overlap: Tt is the learner's
  step (plus the publish it waits for), Tg the time it waits for the next on-policy batch
  (actors draining, loading the weights, generating it);
- the ideal overlap bound (Tg + Tt) / max(Tg, Tt), and the speedup as a share of it;
- the learner's idle fraction (waiting for rollouts) and each actor's (its engine had
  nothing to run), in both modes.

    python benchmarks/learning.py --out benchmarks/results          # about 25 minutes
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

RELAY = str(Path(sys.executable).parent / "relay")
MODES = ("async", "sync")


def run(config: Path, model: str, mode: str, seed: int, run_dir: Path, args) -> dict:
    """One `relay run`; returns its records (metrics, snapshots, results)."""
    overrides = [
        f"model.path={model}", f"mode={mode}", f"seed={seed}", f"run_dir={run_dir}",
        f"learner.time_limit_s={args.budget_s}",
        f"learner.snapshot_every_steps={args.snapshot_every}",
        "eval.every_steps=0", "eval.before=false", "dashboard.enabled=false",
    ]  # fmt: skip
    started = time.monotonic()
    subprocess.run(
        [RELAY, "run", "-c", str(config), *overrides], check=True,
        stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    print(f"{mode} seed {seed}: relay run took {time.monotonic() - started:.0f}s", flush=True)
    read = lambda name: [json.loads(line) for line in (run_dir / name).read_text().splitlines()]  # noqa: E731
    return {
        "metrics": read("metrics.jsonl"),
        "snapshots": read("snapshots/snapshots.jsonl"),
        "results": json.loads((run_dir / "results.json").read_text()),
    }


def score_snapshots(records: dict, config_path: Path, model: str) -> None:
    """Greedy held-out accuracy of every snapshot, with one engine that loads each in turn."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from actors.engine import build_llm
    from actors.weight_sync import update_engine_weights
    from envs.registry import make_env
    from relay.config import load_config
    from relay.evaluate import evaluate

    config = load_config(config_path, [f"model.path={model}"])
    env, tokenizer = make_env(config.env), AutoTokenizer.from_pretrained(model)
    llm = build_llm(model, config.engine, config.seed)
    try:
        for record in records.values():
            for snapshot in record["snapshots"]:
                update_engine_weights(llm, load_file(Path(snapshot["path"]) / "model.safetensors"))
                report = evaluate(
                    llm, tokenizer, env, config.eval, max_model_len=config.engine.max_model_len
                )
                snapshot["accuracy"] = report.accuracy
    finally:
        llm.llm_engine.engine_core.shutdown()


def curve(record: dict) -> list[tuple[float, float]]:
    """(seconds since training started, accuracy) of each snapshot; step 0 is the start."""
    start = record["snapshots"][0]["time"]
    return [(s["time"] - start, s["accuracy"]) for s in record["snapshots"]]


def time_to(points: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, accuracy in points if accuracy >= target), None)


def timing(record: dict) -> dict:
    """Per-step learner time split, steps/s and idle fractions of one run."""
    rows = record["metrics"]
    step = statistics.mean(r["learner/step_s"] + r["learner/publish_block_s"] for r in rows)
    wait = statistics.mean(r["learner/wait_s"] for r in rows)
    seconds = rows[-1]["time"] - record["snapshots"][0]["time"]
    actors = record["results"].get("actors", {})
    return {
        "steps": len(rows),
        "steps_per_s": len(rows) / seconds,
        "train_s_per_step": step,
        "wait_s_per_step": wait,
        "learner_idle": wait / (wait + step),
        "actor_idle": {name: a.get("idle_fraction") for name, a in actors.items()},
        "final_accuracy": record["snapshots"][-1]["accuracy"],
        "heldout_after": record["results"]["after"]["accuracy"],
    }


def summarize(records: dict, seeds: list[int]) -> dict:
    target = statistics.mean(records[f"sync-{s}"]["snapshots"][-1]["accuracy"] for s in seeds)
    reached = {
        mode: [time_to(curve(records[f"{mode}-{s}"]), target) for s in seeds] for mode in MODES
    }
    sync_timing = [timing(records[f"sync-{s}"]) for s in seeds]
    tg = statistics.mean(t["wait_s_per_step"] for t in sync_timing)
    tt = statistics.mean(t["train_s_per_step"] for t in sync_timing)
    bound = (tg + tt) / max(tg, tt)
    summary = {
        "target_accuracy": target,
        "target": "mean over seeds of sync's accuracy at the end of the budget",
        "seconds_to_target": reached,
        "Tg_s_per_step": tg,
        "Tt_s_per_step": tt,
        "overlap_bound": bound,
        "runs": {name: timing(record) for name, record in records.items()},
    }
    if all(t is not None for times in reached.values() for t in times):
        speedup = statistics.mean(reached["sync"]) / statistics.mean(reached["async"])
        summary["speedup_to_target"] = speedup
        summary["speedup_share_of_bound"] = speedup / bound
    steps = {m: statistics.mean(summary["runs"][f"{m}-{s}"]["steps_per_s"] for s in seeds)
             for m in MODES}  # fmt: skip
    summary["steps_per_s"] = steps
    summary["steps_per_s_ratio"] = steps["async"] / steps["sync"]
    return summary


def plot(records: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    colors = {"async": "tab:blue", "sync": "tab:orange"}
    for name, record in records.items():
        mode = name.split("-")[0]
        t, accuracy = zip(*curve(record), strict=True)
        ax.plot(t, [100 * a for a in accuracy], color=colors[mode], alpha=0.8,
                label=f"{mode}, seed {name.split('-')[1]}")  # fmt: skip
    ax.axhline(100 * summary["target_accuracy"], color="grey", ls=":", label="sync's final")
    ax.set_xlabel("training wall clock (s)")
    ax.set_ylabel("held-out accuracy (%, greedy, vLLM)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--model", default="models/tiny-warm", help="the warm-started policy")
    parser.add_argument("--budget-s", type=float, default=200.0)
    parser.add_argument("--snapshot-every", type=int, default=25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-learning"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"no model at {args.model}: run `make demo` (or relay warmstart) first")

    records = {}
    for seed in args.seeds:  # modes alternate, so both see the same machine state
        for mode in MODES:
            run_dir = args.work / f"{mode}-{seed}"
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
            records[f"{mode}-{seed}"] = run(args.config, args.model, mode, seed, run_dir, args)
    score_snapshots(records, args.config, args.model)
    summary = summarize(records, args.seeds)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, vLLM CPU build",
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": str(args.config),
        "budget_s": args.budget_s,
        "seeds": args.seeds,
        "summary": summary,
        "curves": {name: curve(record) for name, record in records.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learning.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(records, summary, args.out / "learning.png")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
