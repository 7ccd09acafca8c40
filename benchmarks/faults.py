"""The demo config under faults: does a run survive them, and is every rollout accounted for?

Each run is `relay run -c configs/demo.yaml` (shortened: LEARN_STEPS steps, checkpoints
every CHECKPOINT_EVERY), with one fault injected at a random step, REPEATS times per
fault:

- `actor_kill`: SIGKILL of one vLLM actor's Ray worker (Ray restarts it);
- `driver_kill`: SIGKILL of the `relay run` process, then `relay run --resume`;
- `redis_kill`: SIGKILL of the embedded redis-server (its supervisor restarts it);
- `redis_pause`: SIGSTOP of redis-server for PAUSE_S seconds, then SIGCONT;
- `group_sigint`: SIGINT to the run's whole process group, as a terminal's Ctrl-C;
- `hostile_actor`: a remote actor joins with a credential of its own (`relay
  actor-credential create`) and, during the run, puts well-formed groups with forged
  rewards, groups with token ids past the vocabulary, tries to bump the learner epoch,
  delete the buffer's keys, run an endless Lua script, and floods its inbox.

After each run the embedded Redis is started again on its AOF and read. Per run: groups
put, trained (sum over the learner's steps), acked, quarantined, ready. Against the
learner's own ledger (`run_dir/ledger-learner-*.jsonl`, a record kept apart from the
buffer, by group id): `trained_twice` = groups the learner trained more than once (it
retrains what it trained after its last checkpoint when the driver is killed);
`acked_lost` = groups the ledger says were acked that Redis does not hold as acked.
`unaccounted` = put minus everything the buffer accounts for (acked, live, dropped,
quarantined). `recovery_s` = seconds from the injection of the fault to the first learner
step recorded after the fault ended (a pause counts whole). Not a test: it takes ~40 minutes.

    python benchmarks/faults.py --out benchmarks/results [--repeats 2] [--faults a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from buffer.config import BufferConfig, RedisServerConfig
from buffer.keys import Keyspace
from buffer.replay_buffer import ReplayBuffer
from buffer.schema import Completion, FinishReason, RolloutGroup, VersionRuns
from buffer.server import BufferUnreachable, RedisServer, connect

RELAY = str(Path(sys.executable).parent / "relay")
CONFIG = "configs/demo.yaml"
LEARN_STEPS, CHECKPOINT_EVERY, PAUSE_S = 160, 40, 60
SUMMED = (
    "groups_put", "groups_trained", "groups_acked", "groups_quarantined", "acked_lost",
    "trained_twice", "trained_unacked", "unaccounted", "steps_lost", "spot_checked",
    "spot_check_failed",
)  # fmt: skip
FAULTS = (
    "actor_kill", "driver_kill", "redis_kill", "redis_pause", "group_sigint", "hostile_actor",
)  # fmt: skip


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


def recovery_s(rows: list[dict], injected: float, ended: float) -> float | None:
    """Seconds from a fault's injection to the first learner step recorded after the fault
    ended (steps finishing during a pause do not count as recovered); None if none came."""
    later = [r["time"] for r in rows if r["time"] > ended]
    return min(later) - injected if later else None


def wait_for_recovery(run_dir: Path, injected: float, ended: float, limit_s: float = 600):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if (seconds := recovery_s(steps_done(run_dir), injected, ended)) is not None:
            return seconds
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


def hostile_actor(admin_url: str, prefix: str, stop_at: float, vocab: int) -> dict:
    """A remote actor with a credential of its own doing what it should not; returns what
    each attempt did."""
    import redis

    from buffer.credentials import name_from_url
    from buffer.gate import GateClient

    issued = subprocess.run(
        [RELAY, "actor-credential", "create", "hostile", "--buffer", admin_url, "--prefix", prefix],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    url = issued.stdout.split()[-1]
    client = connect(url, outage_limit_s=5)
    actor = GateClient(client, BufferConfig(key_prefix=prefix, outage_limit_s=5),
                       name_from_url(url, prefix), "hostile")  # fmt: skip
    outcomes: dict[str, object] = {}

    def attempt(name: str, action) -> None:
        try:
            outcomes[name] = repr(action())[:200]
        except (redis.RedisError, OSError) as error:
            outcomes[name] = f"{type(error).__name__}: {str(error)[:160]}"

    keys = Keyspace(prefix)
    started = time.time()
    forged = stored = 0
    try:
        # Forged rewards first (admission grants it leases only now and then), for a
        # third of its time; then what counts against it, until it is cut off.
        while time.time() < started + (stop_at - started) / 3 and forged < 16:
            version, leases = actor.reserve(2)
            if leases:
                ids = [f"forged-{forged + i}" for i in range(len(leases))]
                groups = [hostile_group(group_id, version, vocab - 1) for group_id in ids]
                stored += actor.put(groups, leases).stored
                forged += len(leases)
            time.sleep(0.2)
        outcomes["forged_rewards_stored"] = stored
        attempt("epoch_bump", lambda: client.incr(keys.of("learner_epoch")))
        attempt("delete_ready", lambda: client.delete(keys.of("ready")))
        attempt("lua_loop", lambda: client.eval("while true do end", 0))
        attempt("read_payloads", lambda: client.keys(f"{prefix}:payload:*"))
        junk = os.urandom(32 << 20)
        attempt("flood", lambda: [client.rpush(keys.inbox("hostile"), junk) for _ in range(4)])
        outcomes["out_of_vocab_sent"] = outcomes["out_of_vocab_refused"] = 0
        while time.time() < stop_at:
            version, leases = actor.reserve(1)
            group = hostile_group(f"oov-{outcomes['out_of_vocab_sent']}", version, vocab + 7)
            outcomes["out_of_vocab_sent"] += 1
            outcomes["out_of_vocab_refused"] += len(actor.put([group], leases).refused)
    except redis.AuthenticationError as error:
        outcomes["revoked_after_s"] = round(time.time() - started, 1)
        outcomes["revoked_error"] = str(error)[:200]
    except BufferUnreachable as error:  # the run ended first
        outcomes["unanswered"] = str(error)[:200]
    return outcomes


def hostile_group(group_id: str, version: int, token: int) -> RolloutGroup:
    """A well-formed group of the demo's shape whose rewards say every completion is right."""
    completions = [
        Completion(
            token_ids=np.full(6, token, np.int32),
            behaviour_logprobs=np.full(6, -0.1, np.float32),
            loss_mask=np.ones(6, np.bool_),
            policy_versions=VersionRuns.constant(version, 6),
            reward=1.0 if i % 2 else 0.0,
            finish_reason=FinishReason.STOP,
        )
        for i in range(8)
    ]
    return RolloutGroup(
        run_id="hostile", group_id=group_id, env_name="arithmetic", prompt_id="arithmetic:1+1=",
        prompt_token_ids=np.array([1, 2, 3], np.int32), completions=completions,
        actor_id="hostile", created_at=time.time(),
    )  # fmt: skip


def read_ledger(run_dir: Path) -> tuple[Counter, list[str]]:
    """What the learner's ranks trained (ids, with how often) and acked, from their ledgers."""
    paths = sorted(run_dir.glob("ledger-learner-*.jsonl"))
    if not paths:
        raise FileNotFoundError(f"no learner ledger in {run_dir}: nothing to account against")
    trained: Counter = Counter()
    acked: list[str] = []
    for path in paths:
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            trained.update(entry.get("trained", []))
            acked += entry.get("acked", [])
    return trained, acked


def account(run_dir: Path) -> dict:
    """The run's buffer, read back from its AOF, against the learner's ledger, by id."""
    trained, ledger_acked = read_ledger(run_dir)
    prefix = "relay"
    with RedisServer(run_dir / "redis", RedisServerConfig()) as server:
        client = server.client()
        buffer = ReplayBuffer(client, BufferConfig(key_prefix=prefix))
        counters = {k.decode(): int(v) for k, v in client.hgetall(buffer.key("counters")).items()}
        # Trained but never acked (given back at a crash): still stored, or dropped since.
        acked_ids = set(ledger_acked)
        trained_unacked = [i for i in trained if i not in acked_ids]
        live = buffer.key("live")
        still_stored = sum(client.zscore(live, i) is not None for i in trained_unacked)
        acked_in_redis = {m.decode() for m in client.zrange(buffer.key("acked"), 0, -1)}
        ready = client.zcard(buffer.key("ready"))
        live = client.zcard(buffer.key("live"))
        revoked = sorted(m.decode() for m in client.smembers(buffer.keyspace.revoked))
        quarantined_by = Counter(r.producer or "(unknown)" for r in buffer.quarantined(10_000))
    accounted = (
        len(acked_in_redis) + live + counters.get("dropped_stale", 0)
        + counters.get("dropped_capacity", 0) + counters.get("quarantined", 0)
    )  # fmt: skip
    return {
        "groups_put": counters.get("put", 0),
        "groups_acked": counters.get("acked", 0),
        "groups_acked_distinct": len(acked_in_redis),
        "groups_quarantined": counters.get("quarantined", 0),
        "quarantined_by_producer": dict(quarantined_by),
        "groups_ready_at_end": ready,
        "groups_dropped_stale": counters.get("dropped_stale", 0),
        "ledger_trained": sum(trained.values()),
        "ledger_acked": len(ledger_acked),
        "acked_lost": len(set(ledger_acked) - acked_in_redis),
        "acked_twice_in_ledger": len(ledger_acked) - len(set(ledger_acked)),
        "trained_twice": sum(n - 1 for n in trained.values() if n > 1),
        "trained_unacked": len(trained_unacked),
        "trained_unacked_still_stored": still_stored,
        "spot_checked": counters.get("spot_checked", 0),
        "spot_check_failed": counters.get("spot_check_failed", 0),
        "accounted": accounted,
        "redelivered": counters.get("redelivered", 0),
        "revoked": revoked,
    }


def one_run(fault: str, run_dir: Path, model: str, rng: random.Random) -> dict:
    at_step = rng.randint(CHECKPOINT_EVERY // 2, LEARN_STEPS - CHECKPOINT_EVERY)
    if fault == "hostile_actor":  # it needs ~15 s of the run (~50 s) to try everything
        at_step = rng.randint(CHECKPOINT_EVERY // 2, CHECKPOINT_EVERY)
    started = time.time()
    process = start(run_dir, model)
    record: dict = {"fault": fault, "at_step": at_step, "run_dir": str(run_dir)}
    if not wait_for_step(process, run_dir, at_step):
        process.wait()
        return {**record, "completed": False, "reason": "did not reach the fault's step"}
    moment = ended = time.time()  # the injection, and the end of an instant fault
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
        ended = time.time()
    elif fault == "group_sigint":
        os.killpg(process.pid, signal.SIGINT)
    elif fault == "driver_kill":
        trained = len(steps_done(run_dir))
        os.killpg(process.pid, signal.SIGKILL)  # the driver and everything it started
        process.wait()
        time.sleep(2)
        process = start(run_dir, model, "--resume")
        ended = time.time()
        # Steps trained after the last checkpoint are trained again.
        steps_lost = trained - (trained // CHECKPOINT_EVERY) * CHECKPOINT_EVERY
    elif fault == "hostile_actor":
        url = (run_dir / "buffer.url").read_text().strip()
        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        record["hostile"] = hostile_actor(url, "relay", time.time() + 30, vocab=vocab)
    recovery = None if fault == "group_sigint" else wait_for_recovery(run_dir, moment, ended)
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
            "hostile_revoked": sum("hostile" in r.get("revoked", []) for r in mine),
        }
    return summary


def unaccounted(run: dict) -> int:
    """Put, minus what the buffer accounts for (acked, live, dropped, quarantined). Groups
    refused at the gate were never put, but are quarantined: they are added back."""
    refused = sum(
        n for producer, n in run.get("quarantined_by_producer", {}).items()
        if producer.startswith("hostile")
    )  # fmt: skip
    return run["groups_put"] + refused - run["accounted"]


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
