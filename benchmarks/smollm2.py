"""configs/smollm2.yaml as a user runs it: SmolLM2-135M-Instruct, asynchronous RL on
2-digit additions asked in words, on this machine's cores, for every seed.

Each seed is one `relay run -c configs/smollm2.yaml seed=S run_dir=RUNS/seedS` (fetch the
model first: `relay model fetch smollm2-135m-instruct`). Reported from the runs' own
records (results.json, metrics.jsonl): held-out accuracy before and after (greedy, vLLM,
the same 200 test prompts for every seed), `relay run`'s wall clock, steps, and the
actor's and learner's tokens per second (completion tokens; the learner's over its
compute time, the actor's over its lifetime, weight loads included).

    python benchmarks/smollm2.py --out benchmarks/results      # about 13 minutes per seed
    python benchmarks/smollm2.py --reuse ...                    # summarise finished runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

RELAY = str(Path(sys.executable).parent / "relay")


def run_seed(config: Path, seed: int, run_dir: Path, reuse: bool) -> dict:
    """One seed's records; runs it unless `reuse` and it already finished."""
    results = run_dir / "results.json"
    if not (reuse and results.is_file()):
        command = [RELAY, "run", "-c", str(config), f"seed={seed}", f"run_dir={run_dir}"]
        subprocess.run(command, check=True)
    summary = json.loads(results.read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    learner_tokens = sum(s["learner/tokens"] for s in steps)
    learner_s = sum(s["learner/step_s"] for s in steps)
    actors = list(summary["actors"].values())
    return {
        "seed": seed,
        "accuracy_before": summary["before"]["accuracy"],
        "accuracy_after": summary["after"]["accuracy"],
        "gain_points": 100 * (summary["after"]["accuracy"] - summary["before"]["accuracy"]),
        "relay_run_s": summary["seconds"],
        "steps": summary["steps"],
        "trained_groups": summary["trained_groups"],
        "learner_tokens_per_s": learner_tokens / learner_s,
        "learner_wait_s_per_step": statistics.mean(s["learner/wait_s"] for s in steps),
        "learner_step_s": statistics.mean(s["learner/step_s"] for s in steps),
        "actor_tokens_per_s": sum(a["tokens_per_s"] for a in actors),
        "actor_weight_load_s": statistics.mean(
            a["weight_load_s"] / max(a["weight_loads"], 1) for a in actors
        ),
        "actor_idle_fraction": statistics.mean(a["idle_fraction"] for a in actors),
        "reward_first_5_steps": statistics.mean(s["learner/reward_mean"] for s in steps[:5]),
        "reward_last_5_steps": statistics.mean(s["learner/reward_mean"] for s in steps[-5:]),
        "time": time_breakdown(summary, steps, actors),
    }


def time_breakdown(summary: dict, steps: list[dict], actors: list[dict]) -> dict:
    """Where the run's wall clock went, for the learner and for the actors (an actor is
    busy while its engine has sequences to run, weight loads during them included, and
    idle otherwise: refused by admission control, or loading weights with nothing running)."""
    waited = sum(s["learner/wait_s"] for s in steps[1:])  # the first wait is start-up
    computed = sum(s["learner/step_s"] + s["learner/publish_block_s"] for s in steps[1:])
    replayed = [s.get("learner/replayed_fraction", 0.0) for s in steps]
    return {
        "run_s": summary["seconds"],
        "evaluation_s": summary["before"]["seconds"] + summary["after"]["seconds"],
        "startup_wait_s": steps[0]["learner/wait_s"],
        "learner_waiting_share": waited / (waited + computed),
        "learner_wait_s": waited,
        "learner_compute_s": computed,
        "replayed_share": statistics.mean(replayed),
        "actors": [
            {
                "busy_s": a["busy_s"],
                "weight_loads": a["weight_loads"],
                "weight_load_s": a["weight_load_s"],
                "idle_s": a["idle_s"],
                "admission_wait_s": a["admission_wait_s"],
                "sampled_tokens": a["tokens"],
                "prefilled_tokens": a["prompt_tokens"],
                "groups_put": a["groups"],
                "uniform_groups_dropped": a["uniform_groups"],
            }
            for a in actors
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/smollm2.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-smollm2"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--reuse", action="store_true", help="summarise finished runs as they are")
    args = parser.parse_args()
    seeds = [run_seed(args.config, s, args.runs / f"seed{s}", args.reuse) for s in args.seeds]
    report = {
        "config": str(args.config),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "seeds": seeds,
        "mean": {
            key: statistics.mean(s[key] for s in seeds)
            for key in seeds[0]
            if key not in ("seed", "time")
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "smollm2.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["mean"], indent=2))


if __name__ == "__main__":
    main()
