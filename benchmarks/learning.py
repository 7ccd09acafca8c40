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
  nothing to run), in both modes;
- the synchronous peer outside Relay (benchmarks/sync_peer.py: plain HF `generate` and a
  PyTorch step, the same recipe, both cores), its steps/s and its curve, for the same
  budget; `--no-peer` skips it.

Time starts when the first batch reaches the learner (the actors' engine start-up, the
same in both modes, is reported apart as startup_wait_s).

    python benchmarks/learning.py --out benchmarks/results          # about 25 minutes
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

RELAY = str(Path(sys.executable).parent / "relay")
MODES = ("async", "sync")
PEER = "hf_sync"
"""benchmarks/sync_peer.py: the same recipe on plain HF generate and a PyTorch step."""


def run(config: Path, model: str, mode: str, seed: int, run_dir: Path, args) -> dict:
    """One `relay run`; returns its records (metrics, snapshots, results)."""
    overrides = [
        f"model.path={model}", f"mode={mode}", f"seed={seed}", f"run_dir={run_dir}",
        f"learner.time_limit_s={args.budget_s}",
        f"learner.snapshot_every_steps={args.snapshot_every}",
        "eval.every_steps=0", "eval.before=false", "dashboard.enabled=false",
    ]  # fmt: skip
    started = time.monotonic()
    with CpuSampler(run_dir / "cpu.jsonl"):
        subprocess.run(
            [RELAY, "run", "-c", str(config), *overrides], check=True,
            stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    print(f"{mode} seed {seed}: relay run took {time.monotonic() - started:.0f}s", flush=True)
    return read_records(run_dir)


class CpuSampler:
    """The machine's busy and idle CPU time (/proc/stat) once a second, to a JSONL file:
    whether an idle learner or actor means idle cores, or cores given to the others."""

    def __init__(self, path: Path) -> None:
        self.path, self.done = path, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> CpuSampler:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    def _sample(self) -> None:
        with self.path.open("w") as out:
            while True:
                fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
                idle = fields[3] + fields[4]  # idle + iowait
                out.write(json.dumps({"time": time.time(), "busy": sum(fields) - idle,
                                      "idle": idle}) + "\n")  # fmt: skip
                out.flush()
                if self.done.wait(1.0):
                    return


def cpu_busy(record: dict, start: float, end: float) -> float | None:
    """Share of the machine's CPU time that was busy between `start` and `end`."""
    inside = [c for c in record.get("cpu", []) if start <= c["time"] <= end]
    if len(inside) < 2:
        return None
    busy = inside[-1]["busy"] - inside[0]["busy"]
    return busy / (busy + inside[-1]["idle"] - inside[0]["idle"])


def prompt_draws(env: object, groups: int, seed: int) -> Iterator[list]:
    """The training prompts of each step for the peers that Relay is compared with: one
    draw of `groups` distinct prompts per step, seeded per run and step, as Relay's actors
    draw theirs (a task may have fewer distinct prompts than steps x groups)."""
    from envs.base import Split

    for draw in itertools.count():
        yield env.prompts(Split.TRAIN, groups, seed * 100_003 + draw)


def snapshot_writer(run_dir: Path, model: object, tokenizer: object) -> Callable[[int], None]:
    """For a peer outside Relay: `write(step)` saves the policy as `relay run`'s snapshots
    are saved (run_dir/snapshots/stepNNNNNNNN, listed with their time)."""
    snapshots = run_dir / "snapshots"
    snapshots.mkdir(parents=True, exist_ok=True)
    listing = (snapshots / "snapshots.jsonl").open("w")

    def write(step: int) -> None:
        path = snapshots / f"step{step:08d}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        listing.write(json.dumps({"step": step, "time": time.time(), "path": str(path)}) + "\n")
        listing.flush()

    return write


def read_records(run_dir: Path) -> dict:
    def lines(name: str) -> list[dict]:
        return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]

    return {
        "metrics": lines("metrics.jsonl"),
        "snapshots": lines("snapshots/snapshots.jsonl"),
        "results": json.loads((run_dir / "results.json").read_text()),
        "cpu": lines("cpu.jsonl") if (run_dir / "cpu.jsonl").is_file() else [],
    }


def score_snapshots(records: dict, config_path: Path, model: str) -> None:
    """Greedy held-out accuracy of every snapshot, with one engine that loads each in turn."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from actors.engine import build_llm
    from actors.evaluation import evaluate
    from envs.registry import make_env
    from relay.config import load_config
    from weights.engine import update_engine_weights

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


def start_time(record: dict) -> float:
    """When the first batch arrived: the learner starts before the actors' engines are
    up, and that start-up wait (the same in both modes) is not training time."""
    relay = "mode" in record["results"]  # the HF peer has no actors to wait for
    return record["snapshots"][0]["time"] + relay * record["metrics"][0]["learner/wait_s"]


def curve(record: dict) -> list[tuple[float, float]]:
    """(seconds of training, accuracy) of each snapshot; the starting policy at 0."""
    start = start_time(record)
    return [(max(0.0, s["time"] - start), s["accuracy"]) for s in record["snapshots"]]


def time_to(points: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, accuracy in points if accuracy >= target), None)


def timing(record: dict) -> dict:
    """Per-step learner time split, steps/s and idle fractions of one run."""
    relay = "mode" in record["results"]
    rows = record["metrics"][relay:]  # a Relay run's first wait is the actors' start-up
    step = statistics.mean(r["learner/step_s"] + r["learner/publish_block_s"] for r in rows)
    wait = statistics.mean(r["learner/wait_s"] for r in rows)
    seconds = rows[-1]["time"] - start_time(record)
    actors = record["results"].get("actors", {})
    return {
        "startup_wait_s": record["metrics"][0]["learner/wait_s"] if relay else 0.0,
        "steps": len(record["metrics"]),
        "steps_per_s": len(rows) / seconds,
        "training_s": seconds,
        "cpu_busy": cpu_busy(record, start_time(record), rows[-1]["time"]),
        "train_s_per_step": step,
        "wait_s_per_step": wait,
        "learner_idle": wait / (wait + step),
        "actor_idle": {name: a.get("idle_fraction") for name, a in actors.items()},
        "final_accuracy": record["snapshots"][-1]["accuracy"],
        "heldout_after": record["results"]["after"]["accuracy"],
    }


def summarize(records: dict, seeds: list[int]) -> dict:
    # Per seed: the accuracy sync ended at, and when each run of that seed first reached it.
    targets = {s: records[f"sync-{s}"]["snapshots"][-1]["accuracy"] for s in seeds}
    target = statistics.mean(targets.values())
    names = [*MODES, PEER] if all(f"{PEER}-{s}" in records for s in seeds) else list(MODES)
    reached = {
        mode: [time_to(curve(records[f"{mode}-{s}"]), targets[s]) for s in seeds] for mode in names
    }
    sync_timing = [timing(records[f"sync-{s}"]) for s in seeds]
    tg = statistics.mean(t["wait_s_per_step"] for t in sync_timing)
    tt = statistics.mean(t["train_s_per_step"] for t in sync_timing)
    bound = (tg + tt) / max(tg, tt)
    summary = {
        "target_accuracy": target,
        "target_accuracy_per_seed": targets,
        "target": "per seed, the accuracy sync's run of that seed ends at (its final policy)",
        "seconds_to_target": reached,
        "Tg_s_per_step": tg,
        "Tt_s_per_step": tt,
        "overlap_bound": bound,
        "runs": {name: timing(record) for name, record in records.items()},
    }
    if all(t is not None for mode in MODES for t in reached[mode]):
        speedup = statistics.mean(reached["sync"]) / statistics.mean(reached["async"])
        summary["speedup_to_target"] = speedup
        summary["speedup_share_of_bound"] = speedup / bound
    steps = {m: statistics.mean(summary["runs"][f"{m}-{s}"]["steps_per_s"] for s in seeds)
             for m in MODES}  # fmt: skip
    summary["steps_per_s"] = steps
    summary["steps_per_s_ratio"] = steps["async"] / steps["sync"]
    if all(f"{PEER}-{s}" in records for s in seeds):
        peer = [summary["runs"][f"{PEER}-{s}"] for s in seeds]
        summary["hf_sync_peer"] = {
            "steps_per_s": statistics.mean(p["steps_per_s"] for p in peer),
            "final_accuracy": [p["final_accuracy"] for p in peer],
        }
        summary["steps_per_s_ratio_vs_hf_sync"] = (
            steps["async"] / summary["hf_sync_peer"]["steps_per_s"]
        )
    return summary


def plot(records: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    colors = {"async": "tab:blue", "sync": "tab:orange", PEER: "tab:grey"}
    for name, record in records.items():
        mode = name.split("-")[0]
        t, accuracy = zip(*curve(record), strict=True)
        ax.plot(t, [100 * a for a in accuracy], color=colors[mode], alpha=0.8,
                label=f"{mode}, seed {name.split('-')[1]}")  # fmt: skip
    ax.axhline(100 * summary["target_accuracy"], color="grey", ls=":",
               label="sync's final (mean)")  # fmt: skip
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
    parser.add_argument("--reuse", action="store_true", help="keep runs already in --work")
    parser.add_argument(
        "--no-peer",
        dest="peer",
        action="store_false",
        help="skip the plain HF synchronous peer (benchmarks/sync_peer.py)",
    )
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"no model at {args.model}: run `make demo` (or relay warmstart) first")

    records = {}
    for seed in args.seeds:  # modes alternate, so both see the same machine state
        for mode in MODES:
            run_dir = args.work / f"{mode}-{seed}"
            if args.reuse and (run_dir / "results.json").is_file():
                records[f"{mode}-{seed}"] = read_records(run_dir)
                continue
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
            records[f"{mode}-{seed}"] = run(args.config, args.model, mode, seed, run_dir, args)
        if args.peer:
            run_dir = args.work / f"{PEER}-{seed}"
            if not (args.reuse and (run_dir / "results.json").is_file()):
                subprocess.run(["rm", "-rf", str(run_dir)], check=True)
                with CpuSampler(run_dir / "cpu.jsonl"):
                    peer = [
                        sys.executable, str(Path(__file__).parent / "sync_peer.py"),
                        "--config", str(args.config), "--model", args.model,
                        "--seed", str(seed), "--run-dir", str(run_dir),
                        "--budget-s", str(args.budget_s),
                        "--snapshot-every", str(args.snapshot_every),
                    ]  # fmt: skip
                    subprocess.run(peer, check=True)
            records[f"{PEER}-{seed}"] = read_records(run_dir)
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
