"""Head to head with the peer a user would pick instead: TRL's GRPOTrainer against `relay run`.

Both start from the same warm start and train with the task config's recipe: the same
batch (`learner.batch_groups` prompts x `actors.group_size` completions), learning rate
and schedule, sampling temperature and token budget; group-normalised advantages, a
token-mean loss, no KL. TRL runs on-policy on both cores (its generation is HF
`generate`: its vLLM integration does not support this vLLM); Relay runs the config as a
user would, its pre-run evaluation included. Neither pauses to evaluate: each exports a
snapshot every few steps with its time, and afterwards one vLLM engine scores every
snapshot greedily on the same held-out prompts (`eval.n_prompts`), with Relay's
evaluator.

Two clocks: from process start (the moment this script spawns `relay run` or the TRL
process: imports, engine starts and Relay's pre-run evaluation count) and from the first
optimizer step. Two targets, both set by TRL's runs: its final accuracy (mean over
seeds), as the issue that asked for this benchmark defined it, and 90 % of TRL's gain over
the shared start. Where both systems end on the same plateau, whether a run touches the
first is down to evaluation noise; the second measures how fast each gets most of the way.
The speedup is TRL's mean time to a target over Relay's (none if a run never reached it).

Tasks: `demo` (configs/demo.yaml, 2-digit additions, replies of 2-4 tokens) and `copy`
(configs/copy.yaml, digit strings whose length is heavy-tailed: the replies' p99 is 8.5x
their median). Needs `pip install -e .[peers]` and both warm starts (`make demo`;
`relay model init -c configs/copy.yaml && relay warmstart -c configs/copy.yaml`).

    python benchmarks/peers.py --out benchmarks/results          # about 25 minutes
    python benchmarks/peers.py --resummarize                     # new targets, same curves
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
import time
from pathlib import Path

from learning import CpuSampler, prompt_draws, read_records, score_snapshots, snapshot_writer

RELAY = str(Path(sys.executable).parent / "relay")
TASKS = {
    "demo": (Path("configs/demo.yaml"), "models/tiny-warm"),
    "copy": (Path("configs/copy.yaml"), "models/tiny-copy-warm"),
}
SYSTEMS = ("relay", "trl")


def run_relay(
    config: Path, model: str, seed: int, run_dir: Path, snapshot_every: int, extra: list[str]
) -> None:
    overrides = [
        f"model.path={model}", f"seed={seed}", f"run_dir={run_dir}",
        f"learner.snapshot_every_steps={snapshot_every}", "eval.every_steps=0",
        "dashboard.enabled=false", *extra,
    ]  # fmt: skip
    spawned = time.time()
    subprocess.run(
        [RELAY, "run", "-c", str(config), *overrides], check=True, stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    (run_dir / "spawned.json").write_text(json.dumps({"time": spawned}))


def run_trl(
    config: Path, model: str, seed: int, run_dir: Path, snapshot_every: int, extra: list[str]
) -> None:
    spawned = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, __file__, "--trl-worker", "--config", str(config), "--model", model,
         "--seed", str(seed), "--run-dir", str(run_dir), "--snapshot-every", str(snapshot_every),
         *(f"--set={override}" for override in extra)],
        check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    (run_dir / "spawned.json").write_text(json.dumps({"time": spawned}))


def trl_worker(args: argparse.Namespace) -> None:
    """TRL's GRPOTrainer with the task's recipe; snapshots and step times as Relay writes them."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from envs.base import Message
    from envs.registry import make_env
    from relay.config import load_config

    config = load_config(args.config, [f"model.path={args.model}", f"seed={args.seed}", *args.set])
    learner, actors = config.learner, config.actors
    env = make_env(config.env)
    draws = prompt_draws(env, learner.batch_groups, args.seed)
    prompts = [prompt for batch in itertools.islice(draws, learner.steps) for prompt in batch]
    rows = [{"prompt": [{"role": m.role, "content": m.content} for m in p.messages],
             "index": i} for i, p in enumerate(prompts)]  # fmt: skip

    def reward(completions: list, index: list, **_: object) -> list[float]:
        return [
            env.verify(prompts[i], [Message("assistant", c[0]["content"])]).reward
            for c, i in zip(completions, index, strict=True)
        ]

    trainer_config = GRPOConfig(
        output_dir=str(args.run_dir / "trl"), use_cpu=True, bf16=False, report_to=[],
        save_strategy="no", logging_steps=50, disable_tqdm=True, seed=args.seed,
        per_device_train_batch_size=learner.batch_groups * actors.group_size,
        num_generations=actors.group_size, steps_per_generation=1,
        max_steps=learner.steps, learning_rate=learner.lr, warmup_steps=learner.warmup_steps,
        lr_scheduler_type="cosine" if learner.lr_schedule == "cosine" else learner.lr_schedule,
        weight_decay=learner.weight_decay, max_grad_norm=learner.max_grad_norm,
        optim="adamw_torch", temperature=actors.sampling.temperature,
        max_completion_length=actors.sampling.max_tokens, beta=config.learner.kl_coef,
        loss_type="dapo", scale_rewards="group", shuffle_dataset=False,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    snapshot = snapshot_writer(args.run_dir, model, tokenizer)
    metrics = (args.run_dir / "metrics.jsonl").open("w")

    class Record(TrainerCallback):
        def on_train_begin(self, *_: object, **__: object) -> None:
            snapshot(0)

        def on_step_end(self, _args: object, state: object, *__: object, **___: object) -> None:
            metrics.write(json.dumps({"step": state.global_step, "time": time.time()}) + "\n")
            metrics.flush()
            if state.global_step % args.snapshot_every == 0:
                snapshot(state.global_step)

    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=trainer_config, processing_class=tokenizer,
        train_dataset=Dataset.from_list(rows), callbacks=[Record()],
    )  # fmt: skip
    trainer.train()
    if learner.steps % args.snapshot_every:
        snapshot(learner.steps)
    (args.run_dir / "results.json").write_text(json.dumps({"steps": learner.steps}) + "\n")


def clocks(record: dict, spawned: float) -> dict:
    """Each snapshot's seconds from process start and from the first optimizer step."""
    first_step = record["metrics"][0]["time"]
    return {
        "from_start": [(s["time"] - spawned, s["accuracy"]) for s in record["snapshots"]],
        "from_first_step": [
            (max(0.0, s["time"] - first_step), s["accuracy"]) for s in record["snapshots"]
        ],
        "startup_s": first_step - spawned,
        "steps": len(record["metrics"]),
        "training_s": record["metrics"][-1]["time"] - first_step,
        "final_accuracy": record["snapshots"][-1]["accuracy"],
    }


def time_to(points: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, accuracy in points if accuracy >= target), None)


def summarize(runs: dict) -> dict:
    """Each run's time, on both clocks, to two targets set by TRL's runs: its final
    accuracy (the mean of its seeds), and 90 % of its gain over the shared start. Where
    both systems end on the same plateau, whether a run reaches the first is down to the
    evaluation's noise (about 2 points on 500 prompts); the second is not."""
    trl = [r for name, r in runs.items() if name.startswith("trl")]
    final = statistics.mean(r["final_accuracy"] for r in trl)
    start = statistics.mean(r["from_start"][0][1] for r in trl)
    targets = {
        "trl_final": (final, "TRL's final accuracy, mean of seeds"),
        "trl_gain_90": (start + 0.9 * (final - start), "90 % of TRL's mean gain over the start"),
    }
    summary: dict = {"start_accuracy": start, "targets": {}}
    for key, (accuracy, what) in targets.items():
        row: dict = {"accuracy": accuracy, "what": what}
        for clock in ("from_start", "from_first_step"):
            reached = {name: time_to(r[clock], accuracy) for name, r in runs.items()}
            row[f"seconds_{clock}"] = reached
            by_system = {s: [t for n, t in reached.items() if n.startswith(s)] for s in SYSTEMS}
            done = all(t is not None for times in by_system.values() for t in times)
            row[f"speedup_{clock}"] = (
                statistics.mean(by_system["trl"]) / statistics.mean(by_system["relay"])
                if done
                else None
            )
        summary["targets"][key] = row
    for system in SYSTEMS:
        mine = [r for n, r in runs.items() if n.startswith(system)]
        summary[system] = {
            "final_accuracy": [r["final_accuracy"] for r in mine],
            "startup_s": [r["startup_s"] for r in mine],
            "steps_per_s": [r["steps"] / r["training_s"] for r in mine],
        }
    return summary


def reply_lengths(config: Path, n: int = 5000) -> dict:
    """Reference replies' tokens (reply + end of turn) over training prompts: the task's
    spread of episode lengths."""
    import numpy as np
    from transformers import AutoTokenizer

    from envs.base import Split
    from envs.registry import make_env
    from relay.config import load_config

    loaded = load_config(config, [])
    tokenizer = AutoTokenizer.from_pretrained(TASKS[_task_of(config)][1])
    lengths = np.array([
        len(tokenizer(p.reference, add_special_tokens=False)["input_ids"]) + 1
        for p in make_env(loaded.env).prompts(Split.TRAIN, n, 0)
    ])  # fmt: skip
    p50, p99 = float(np.percentile(lengths, 50)), float(np.percentile(lengths, 99))
    return {"p50": p50, "p99": p99, "p99_over_p50": p99 / p50, "mean": float(lengths.mean())}


def _task_of(config: Path) -> str:
    return next(name for name, (path, _) in TASKS.items() if path == config)


def plot(curves: dict, summaries: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(curves), 2, figsize=(11, 4 * len(curves)), squeeze=False)
    colors = {"relay": "tab:blue", "trl": "tab:orange"}
    for row, (task, runs) in zip(axes, curves.items(), strict=True):
        for ax, clock in zip(row, ("from_start", "from_first_step"), strict=True):
            for name, run in runs.items():
                t, accuracy = zip(*run[clock], strict=True)
                ax.plot(t, [100 * a for a in accuracy], color=colors[name.split("-")[0]],
                        alpha=0.8, label=name)  # fmt: skip
            for key, style in (("trl_final", ":"), ("trl_gain_90", "--")):
                target = summaries[task]["targets"][key]
                ax.axhline(100 * target["accuracy"], color="grey", ls=style, lw=1,
                           label=target["what"])  # fmt: skip
            ax.set_title(f"{task}: seconds {clock.replace('_', ' ')}", fontsize=10)
            ax.set_xlabel("wall clock (s)")
            ax.set_ylabel("held-out accuracy (%, greedy, vLLM)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--snapshot-every", type=int, default=25)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-peers"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--reuse", action="store_true", help="keep runs already in --work")
    parser.add_argument(
        "--resummarize", action="store_true",
        help="recompute the summary and plot from the curves already in OUT/peers.json",
    )  # fmt: skip
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a config override for both systems (e.g. learner.steps=20 for a quick check)",
    )  # fmt: skip
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        return trl_worker(args)
    if args.resummarize:
        report = json.loads((args.out / "peers.json").read_text())
        report["summary"] = {task: summarize(c) for task, c in report["curves"].items()}
        return write(report, args.out)
    for task in args.tasks:
        model = TASKS[task][1]
        if not (Path(model) / "config.json").is_file():
            sys.exit(f"no model at {model}: warm-start it first (see this script's docstring)")

    curves, summaries, lengths = {}, {}, {}
    for task in args.tasks:
        config, model = TASKS[task]
        records = {}
        for seed in args.seeds:  # systems alternate, so both see the same machine state
            for system, launch in (("relay", run_relay), ("trl", run_trl)):
                name, run_dir = f"{system}-{seed}", args.work / task / f"{system}-{seed}"
                if not (args.reuse and (run_dir / "spawned.json").is_file()):
                    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
                    started = time.monotonic()
                    with CpuSampler(args.work / task / f"{name}-cpu.jsonl"):
                        launch(config, model, seed, run_dir, args.snapshot_every, args.set)
                    print(f"{task} {name}: {time.monotonic() - started:.0f}s", flush=True)
                records[name] = read_records(run_dir) | {
                    "spawned": json.loads((run_dir / "spawned.json").read_text())["time"]
                }
        score_snapshots(records, config, model)
        curves[task] = {name: clocks(r, r["spawned"]) for name, r in records.items()}
        summaries[task] = summarize(curves[task])
        lengths[task] = reply_lengths(config)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, vLLM CPU build, TRL 1.16.0 (HF generate)",
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seeds": args.seeds,
        "overrides": args.set,
        "reply_tokens": lengths,
        "summary": summaries,
        "curves": curves,
    }
    write(report, args.out)


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report["curves"], report["summary"], out / "peers.png")
    print(json.dumps(report["summary"], indent=1))


if __name__ == "__main__":
    main()
