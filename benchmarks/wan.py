"""Actors in another datacenter: the demo trained across an emulated long link.

Each cell runs `configs/demo.yaml` as a learner-only `relay run` (learner, Redis, gate)
in one namespace and two `relay actor` processes, each with its own credential, in the
other (`benchmarks/netlab.py`), joined by a link of the cell's RTT, bandwidth and loss.
The actors reach nothing but the buffer's address across that link; weights cross it
in bfloat16 (`actors.weight_dtype`), as deltas once an actor holds a version.

Per cell it records: bytes per version (full frame and delta, from the weight store),
publish-to-fetched latency and the link's bytes/s (the actors' own reports), steps/s,
learner idle, the sampled-staleness histogram, held-out accuracy after the fixed
training budget and the time to reach `--target`, and, from the learner's ledger
against the buffer, acked groups lost and groups trained twice. The first cell of the
grid is the same machine's figure (no delay, no shaping) that the others are compared to.
One cell repeats a link with a blackout (the link down for `--blackout-s`).

    python -m benchmarks.wan                       # the cells below (about 5 min each)
    python -m benchmarks.wan --grid full           # RTT x bandwidth x loss, 18 cells

Needs root (network namespaces) and models/tiny-warm (`make demo` builds it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.faults import account
from benchmarks.netlab import ACTORS_NS, LEARNER_IP, LEARNER_NS, ROOT, Link, two_datacenters
from buffer.config import BufferConfig
from buffer.replay_buffer import ReplayBuffer
from buffer.server import RedisServer, RedisServerConfig
from buffer.stats import read_stats
from buffer.telemetry import Telemetry

RELAY = str(Path(sys.executable).parent / "relay")
RESULTS = ROOT / "benchmarks" / "results"
STEPS, EVAL_EVERY = 400, 50
QUICK = [
    Link(),  # the same machine's figure
    Link(50, 100),
    Link(150, 100),
    Link(150, 20, 0.01),
]
FULL = [
    Link(rtt, mbit, loss) for rtt in (0, 50, 150) for mbit in (1000, 100, 20) for loss in (0, 0.01)
]
BLACKOUT_LINK = Link(50, 100)


def run_cell(
    link: Link, run_dir: Path, blackout_s: float, target: float, extra: list[str] = ()
) -> dict:
    """One training run across `link`; its figures."""
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    run_dir.mkdir(parents=True)
    log = (run_dir.parent / f"{run_dir.name}.out").open("w")
    with two_datacenters(link) as lab:
        started = time.time()
        learner = lab.popen(LEARNER_NS, [
            RELAY, "run", "-c", "configs/demo.yaml", f"run_dir={run_dir}",
            "model.path=models/tiny-warm", "actors.num_actors=0", f"redis.bind={LEARNER_IP}",
            "actors.weight_dtype=bfloat16",
            f"learner.steps={STEPS}", f"eval.every_steps={EVAL_EVERY}", "eval.before=false",
            "eval.n_prompts=200", *extra,
        ], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        _wait_for(lambda: (run_dir / "buffer.url").is_file(), learner, 180)
        port = int((run_dir / "buffer.url").read_text().strip().rsplit(":", 1)[1].split("/")[0])
        address = lab.proxy(16390, port)
        for index in range(2):
            url = _credential(run_dir, f"dc-b-{index}", address)
            # At nice 15, as Ray starts the demo's own actors: the learner comes first.
            lab.popen(ACTORS_NS, [
                "nice", "-n", "15", RELAY, "actor", "--buffer", url, "--prefix", "relay",
                "--actor-id", f"dc-b-{index}", "--cache", str(run_dir / f"cache-{index}"),
            ], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
               env={**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str(index)})  # fmt: skip
        cut = None
        if blackout_s:
            _wait_for(lambda: len(_metrics(run_dir)) >= STEPS // 4, learner, 600)
            cut = time.time()
            threading.Thread(target=lab.blackout, args=(blackout_s,)).start()
        if learner.wait(timeout=1800) != 0:
            raise RuntimeError(f"the learner failed: see {log.name}")
        wall_s = time.time() - started
    return {"link": link.label, "emulation": lab.emulation, "rtt_ms": link.rtt_ms,
            "mbit": link.mbit, "loss": link.loss, "blackout_s": blackout_s,
            "blackout_at_s": None if cut is None else round(cut - started, 1),
            "wall_s": round(wall_s, 1), **_figures(run_dir, started, target)}  # fmt: skip


def _wait_for(condition, process: subprocess.Popen, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the learner-only run did not get going")
        time.sleep(0.2)


def _credential(run_dir: Path, name: str, address: str) -> str:
    """Issue credential `name` from inside the learner's namespace; its URL via `address`."""
    issued = subprocess.run(
        ["ip", "netns", "exec", LEARNER_NS, RELAY, "actor-credential", "create", name,
         "--host", address, "-c", "configs/demo.yaml", f"run_dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return re.findall(r"redis://\S+", issued.stdout)[-1]


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _figures(run_dir: Path, started: float, target: float) -> dict:
    rows = [r for r in _metrics(run_dir) if "learner/wait_s" in r]
    evals = [(r["time"] - started, r["step"], r["eval/greedy_accuracy"])
             for r in _metrics(run_dir) if "eval/greedy_accuracy" in r]  # fmt: skip
    reached = next((t for t, _, accuracy in evals if accuracy >= target), None)
    wait = sum(r["learner/wait_s"] for r in rows)
    busy = sum(r["learner/wait_s"] + r["learner/step_s"] + r.get("learner/publish_block_s", 0)
               for r in rows)  # fmt: skip
    span = rows[-1]["time"] - rows[0]["time"] if len(rows) > 1 else 0.0
    with RedisServer(run_dir / "redis", RedisServerConfig()) as server:
        client = server.client()
        buffer = ReplayBuffer(client, BufferConfig(key_prefix="relay"))
        sampled = read_stats(buffer).sampled_staleness_histogram
        health = Telemetry(client, "relay").health()
        full, delta, versions = [], [], 0
        for key in client.keys("relay:weights:*:manifest"):
            manifest = json.loads(client.get(key))
            versions += 1
            full.append(sum(row[4] for row in manifest["layout"]))
            if manifest["delta"] is not None:
                delta.append(manifest["delta"]["bytes"])
    actors = {
        name: {k: record.get(k) for k in (
            "groups", "weight_bytes", "weight_bytes_per_s", "weight_full_fetches",
            "weight_delta_fetches", "last_weight_fetch_s", "last_weight_latency_s",
            "weight_wait_s", "version_lag")}
        for name, record in health.items()
    }  # fmt: skip
    accounting = account(run_dir)
    return {
        "steps": len(rows),
        "steps_per_s": round((len(rows) - 1) / span, 2) if span else None,
        "learner_idle": round(wait / busy, 3) if busy else None,
        "evals": [[round(t, 1), step, accuracy] for t, step, accuracy in evals],
        "final_accuracy": evals[-1][2] if evals else None,
        "time_to_target_s": None if reached is None else round(reached, 1),
        "sampled_staleness": {str(k): v for k, v in sorted(sampled.items())},
        "bytes_per_version_full": max(full) if full else None,
        "bytes_per_version_delta_median": sorted(delta)[len(delta) // 2] if delta else None,
        "share_of_versions_with_delta": round(len(delta) / versions, 2) if versions else None,
        "actors": actors,
        "dropped_stale": accounting["groups_dropped_stale"],
        "acked_lost": accounting["acked_lost"],
        "trained_twice": accounting["trained_twice"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", choices=("quick", "full"), default="quick")
    parser.add_argument("--blackout-s", type=float, default=30.0)
    parser.add_argument("--target", type=float, default=0.65, help="held-out accuracy to time")
    parser.add_argument("--links", help="cells as RTT_MS:MBIT:LOSS, comma-separated "
                        "(MBIT 'none': unshaped), instead of --grid")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every cell")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "wan.json")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "wan")
    args = parser.parse_args()
    # Stopped by SIGINT or SIGTERM (also when started in the background, which ignores
    # SIGINT), the lab still stops what it started and removes its namespaces.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))
    cells = QUICK if args.grid == "quick" else FULL
    if args.links:
        cells = [_parse_link(text) for text in args.links.split(",")]
    results = {"measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "target": args.target,
               "steps": STEPS, "cells": []}  # fmt: skip
    plan = [(link, 0.0) for link in cells]
    if args.blackout_s:
        plan.append((BLACKOUT_LINK, args.blackout_s))
    results["overrides"] = args.set
    for index, (link, blackout) in enumerate(plan):
        name = f"cell-{index}" + ("-blackout" if blackout else "")
        print(f"[{index + 1}/{len(plan)}] {_label(link.label, blackout)}", flush=True)
        cell = run_cell(link, args.work / name, blackout, args.target, args.set)
        results["cells"].append(cell)
        print(f"  {cell['steps_per_s']} steps/s, final {cell['final_accuracy']}, "
              f"to {args.target:.0%} in {cell['time_to_target_s']} s", flush=True)  # fmt: skip
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))


def _parse_link(text: str) -> Link:
    rtt, mbit, loss = text.split(":")
    return Link(float(rtt), None if mbit == "none" else float(mbit), float(loss))


def _label(link: str, blackout_s: float) -> str:
    return link + (f", {blackout_s:g} s blackout" if blackout_s else "")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for cell in results["cells"]:
        if cell["evals"]:
            label = _label(cell["link"], cell["blackout_s"])
            ax.plot([t for t, _, _ in cell["evals"]], [a for _, _, a in cell["evals"]],
                    marker="o", label=label)  # fmt: skip
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("held-out accuracy (greedy, 200 prompts)")
    ax.set_title("the demo with its actors across an emulated link")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
