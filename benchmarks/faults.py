"""The demo config under faults: does a run survive them, and is every rollout accounted for?

Each run is `relay run -c configs/demo.yaml` (shortened: LEARN_STEPS steps, checkpoints
every CHECKPOINT_EVERY), with one fault injected at a random step, REPEATS times per
fault:

- `actor_kill`: SIGKILL of one vLLM actor's Ray worker (Ray restarts it);
- `driver_kill`: SIGKILL of the `relay run` process, then `relay run --resume`;
- `redis_kill`: SIGKILL of the embedded redis-server (its supervisor restarts it);
- `redis_pause`: SIGSTOP of redis-server for PAUSE_S seconds, then SIGCONT;
- `group_sigint`: SIGINT to the run's whole process group, as a terminal's Ctrl-C;
- `poison`: a second producer writes garbage entries past `put`, and groups `put`
  must refuse (NaN log-probs, token ids past the vocabulary), during the run.

After each run the embedded Redis is started again on its AOF and read. Per run:
groups put, trained (sum over the learner's steps), acked (Redis's counter, and distinct
acked ids), quarantined, ready; `acked_lost` = groups the learner logged as acked minus
those Redis holds as acked (must be 0); `trained_twice` = acks beyond distinct acked ids
(must be 0); `unaccounted` = put plus the poison producer's injected entries (written
past `put`'s counter) minus everything the buffer can account for (must be 0); steps lost
(trained but not checkpointed before a driver kill); seconds from the fault to the next
learner step. Writes benchmarks/results/faults.json. Not a test: it takes ~40 minutes.

    python benchmarks/faults.py --out benchmarks/results [--repeats 2] [--faults a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from buffer.config import BufferConfig, RedisServerConfig
from buffer.replay_buffer import ReplayBuffer
from buffer.server import RedisServer, connect

RELAY = str(Path(sys.executable).parent / "relay")
CONFIG = "configs/demo.yaml"
LEARN_STEPS, CHECKPOINT_EVERY, PAUSE_S = 160, 40, 60
SUMMED = (
    "groups_put", "groups_trained", "groups_acked", "groups_quarantined", "acked_lost",
    "trained_twice", "unaccounted", "steps_lost",
)  # fmt: skip
FAULTS = ("actor_kill", "driver_kill", "redis_kill", "redis_pause", "group_sigint", "poison")


def overrides(run_dir: Path, model: str) -> list[str]:
    return [
        f"run_dir={run_dir}", f"model.path={model}", f"learner.steps={LEARN_STEPS}",
        f"learner.checkpoint.every_steps={CHECKPOINT_EVERY}", "eval.n_prompts=100",
        f"eval.every_steps={LEARN_STEPS}", "eval.before=false",
    ]  # fmt: skip


def start(run_dir: Path, model: str, *extra: str) -> subprocess.Popen:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = (run_dir.parent / f"{run_dir.name}.out").open("a")
    return subprocess.Popen(
        [RELAY, "run", "-c", CONFIG, *overrides(run_dir, model), *extra],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def steps_done(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int, limit_s: float = 900):
    deadline = time.monotonic() + limit_s
    while len(steps_done(run_dir)) < step:
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def next_step_after(run_dir: Path, moment: float, limit_s: float = 600) -> float | None:
    """Seconds from `moment` (time.time()) to the first learner step recorded after it."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        later = [r["time"] for r in steps_done(run_dir) if r["time"] > moment]
        if later:
            return min(later) - moment
        time.sleep(0.1)
    return None


def actor_pids(driver: int) -> list[int]:
    """The rollout actors' Ray workers of this run: descendants of its driver (the local
    Ray it started is), whose command line Ray names after the actor class."""
    ps = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    parent, args = {}, {}
    for line in ps.splitlines()[1:]:
        pid, ppid, *rest = line.split(None, 2)
        parent[int(pid)], args[int(pid)] = int(ppid), " ".join(rest)

    def descends(pid: int) -> bool:
        while pid > 1:
            if pid == driver:
                return True
            pid = parent.get(pid, 0)
        return False

    return [p for p, a in args.items() if "ray::RolloutActor" in a and descends(p)]


def poison_producer(url: str, prefix: str, stop_at: float, vocab: int) -> int:
    """Garbage entries written past `put`, and groups `put` must refuse; returns how many."""
    from tests.buffer.factories import versioned_group

    client = connect(url)
    buffer = ReplayBuffer(client, BufferConfig(key_prefix=prefix, vocab_size=vocab))
    sent = 0
    while time.time() < stop_at:
        version = buffer.version()
        entry = f"evil-{sent}"
        client.set(buffer.payload_key(entry), os.urandom(64))  # garbage, past put's checks
        client.zadd(buffer.key("ready"), {entry: version})
        client.zadd(buffer.key("live"), {entry: version})
        nan = versioned_group(f"nan-{sent}", version)
        nan.completions[0].behaviour_logprobs[0] = np.nan
        big = versioned_group(f"vocab-{sent}", version)
        big.completions[0].token_ids[0] = vocab + 7
        buffer.put([nan, big], "poisoner")
        sent += 3
        time.sleep(0.5)
    return sent


def account(run_dir: Path) -> dict:
    """The run's buffer, read back from its AOF, and what the learner logged as acked."""
    log_text = (run_dir / "relay.log").read_text() if (run_dir / "relay.log").exists() else ""
    logged_acks = sum(int(n) for n in re.findall(r"(\d+) groups acked", log_text))
    logged_acks += sum(int(n) for n in re.findall(r"acked (\d+) groups whose update", log_text))
    prefix = "relay"
    with RedisServer(run_dir / "redis", RedisServerConfig()) as server:
        client = server.client()
        buffer = ReplayBuffer(client, BufferConfig(key_prefix=prefix))
        counters = {k.decode(): int(v) for k, v in client.hgetall(buffer.key("counters")).items()}
        distinct_acked = client.zcard(buffer.key("acked"))
        ready = client.zcard(buffer.key("ready"))
        live = client.zcard(buffer.key("live"))
    accounted = (
        distinct_acked + live + counters.get("dropped_stale", 0)
        + counters.get("dropped_capacity", 0) + counters.get("quarantined", 0)
    )  # fmt: skip
    return {
        "groups_put": counters.get("put", 0),
        "groups_acked": counters.get("acked", 0),
        "groups_acked_distinct": distinct_acked,
        "groups_quarantined": counters.get("quarantined", 0),
        "groups_ready_at_end": ready,
        "groups_dropped_stale": counters.get("dropped_stale", 0),
        "acked_lost": max(0, logged_acks - counters.get("acked", 0)),
        "trained_twice": counters.get("acked", 0) - distinct_acked,
        "accounted": accounted,
        "redelivered": counters.get("redelivered", 0),
    }


def one_run(fault: str, run_dir: Path, model: str, rng: random.Random) -> dict:
    at_step = rng.randint(CHECKPOINT_EVERY // 2, LEARN_STEPS - CHECKPOINT_EVERY)
    started = time.time()
    process = start(run_dir, model)
    record: dict = {"fault": fault, "at_step": at_step, "run_dir": str(run_dir)}
    if not wait_for_step(process, run_dir, at_step):
        process.wait()
        return {**record, "completed": False, "reason": "did not reach the fault's step"}
    moment = time.time()
    steps_lost = 0
    if fault == "actor_kill":
        os.kill(rng.choice(actor_pids(process.pid)), signal.SIGKILL)
    elif fault == "redis_kill":
        os.kill(int((run_dir / "redis" / "redis.pid").read_text()), signal.SIGKILL)
    elif fault == "redis_pause":
        pid = int((run_dir / "redis" / "redis.pid").read_text())
        os.kill(pid, signal.SIGSTOP)
        time.sleep(PAUSE_S)
        os.kill(pid, signal.SIGCONT)
    elif fault == "group_sigint":
        os.killpg(process.pid, signal.SIGINT)
    elif fault == "driver_kill":
        trained = len(steps_done(run_dir))
        os.killpg(process.pid, signal.SIGKILL)  # the driver and everything it started
        process.wait()
        time.sleep(2)
        process = start(run_dir, model, "--resume")
        moment = time.time()
        # Steps trained after the last checkpoint are trained again.
        steps_lost = trained - (trained // CHECKPOINT_EVERY) * CHECKPOINT_EVERY
    elif fault == "poison":
        url = (run_dir / "buffer.url").read_text().strip()
        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        record["poison_sent"] = poison_producer(url, "relay", time.time() + 20, vocab=vocab)
    recovery = None if fault == "group_sigint" else next_step_after(run_dir, moment)
    code = process.wait()
    rows = steps_done(run_dir)
    results = run_dir / "results.json"
    completed = code == 0 and results.is_file()
    expected_steps = None if fault == "group_sigint" else LEARN_STEPS
    if completed and expected_steps is not None:
        completed = json.loads(results.read_text())["steps"] == expected_steps
    run = {
        **record,
        "completed": completed,
        "exit_code": code,
        "steps": len({r["step"] for r in rows}),
        "groups_trained": int(sum(r["groups"] for r in rows)),
        "steps_lost": steps_lost,
        "recovery_s": recovery,
        "run_s": time.time() - started,
        **account(run_dir),
    }
    return {**run, "unaccounted": unaccounted(run)}


def summarize(runs: list[dict], faults: list[str]) -> dict:
    summary = {}
    for fault in faults:
        mine = [r for r in runs if r["fault"] == fault]
        recoveries = [r["recovery_s"] for r in mine if r.get("recovery_s") is not None]
        summary[fault] = {
            "runs": len(mine),
            "completed": sum(r["completed"] for r in mine),
            **{key: sum(r.get(key, 0) for r in mine) for key in SUMMED},
            "recovery_s_max": max(recoveries) if recoveries else None,
        }
    return summary


def unaccounted(run: dict) -> int:
    """Put, plus entries the poison producer wrote past put's counter, minus what the buffer
    accounts for (acked, live, dropped, quarantined)."""
    return run["groups_put"] + run.get("poison_sent", 0) - run["accounted"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--runs", type=Path, default=Path("runs/faults"))
    parser.add_argument("--model", default="models/tiny-warm")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--summarize", type=Path, help="recompute the summary of an earlier faults.json's runs"
    )
    args = parser.parse_args()
    if args.summarize:
        earlier = json.loads(args.summarize.read_text())
        for run in earlier["runs"]:
            run.setdefault("accounted", run["groups_put"] - run["unaccounted"])
            run["unaccounted"] = unaccounted(run)
        earlier["summary"] = summarize(earlier["runs"], list(earlier["summary"]))
        args.summarize.write_text(json.dumps(earlier, indent=2) + "\n")
        print(json.dumps(earlier["summary"], indent=2))
        return
    rng = random.Random(args.seed)
    runs = []
    for fault in args.faults.split(","):
        for repeat in range(args.repeats):
            run_dir = args.runs / f"{fault}-{repeat}"
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
            print(f"{fault} #{repeat} ...", flush=True)
            runs.append(one_run(fault, run_dir, args.model, rng))
            print(json.dumps(runs[-1]), flush=True)
    summary = summarize(runs, args.faults.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    out = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "config": CONFIG,
        "learn_steps": LEARN_STEPS,
        "checkpoint_every": CHECKPOINT_EVERY,
        "pause_s": PAUSE_S,
        "summary": summary,
        "runs": runs,
    }
    (args.out / "faults.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
