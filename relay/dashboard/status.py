"""`relay status`: the dashboard's figures in a terminal, for SSH sessions and scripts."""

from __future__ import annotations

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text


def status_record(snapshot: dict) -> dict:
    """What `relay status --json` prints: the snapshot without the time series."""
    return {k: v for k, v in snapshot.items() if k not in ("series", "learner_history")}


def render(snapshot: dict) -> Group:
    """Headline, buffer, staleness, learner and actors; fits an 80-column terminal."""
    buffer, learner = snapshot["buffer"], snapshot["learner"]
    headline = Text.assemble(
        ("relay ", "bold"), (snapshot["prefix"], "cyan"),
        f"  policy v{buffer['learner_version']}",
        f"  step {_value(learner.get('step'))}",
        f"  reward {_value(learner.get('reward_mean'), '.2f')}",
        f"  held-out {_value(learner.get('accuracy'), '.1%')}",
        f"  learner idle {_value(learner.get('idle_fraction'), '.1%')}",
    )  # fmt: skip
    parts: list = [headline]
    if snapshot.get("error"):
        parts.append(Text(snapshot["error"], style="red"))
    parts.append(_figures(buffer, learner))
    parts.append(_actor_table(snapshot["actors"]))
    for a in snapshot["actors"]:
        if a.get("weight_bytes_per_s") is not None:  # its link to the weight store
            parts.append(Text(
                f"{a['actor_id']} weights: {a['weight_bytes_per_s'] / 1e6:.1f} MB/s, last fetch "
                f"{a['last_weight_fetch_s']:.2f}s, {_value(a['version_lag'])} versions behind"
            ))  # fmt: skip
    errors = [a for a in snapshot["actors"] if a["last_error"]]
    for actor in errors:
        parts.append(Text(f"{actor['actor_id']} last error: {actor['last_error']}", style="red"))
    return Group(*parts)


def _figures(buffer: dict, learner: dict) -> Table:
    """Label / figures rows; the figures wrap instead of squeezing columns."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    lost = buffer["lost_work"]
    grid.add_row(
        "buffer",
        f"ready {buffer['depth']}  claimed {buffer['claimed']}  being generated "
        f"{buffer['in_flight']}  stored {buffer['bytes'] / 2**20:.2f} MiB",
    )
    grid.add_row(
        "lost work", "  ".join(f"{name.replace('_', ' ')} {n}" for name, n in lost.items())
    )
    uses = buffer["uses"]
    if any(use > 1 for use, _ in uses["counts"]):
        last = learner.get("replayed_fraction")
        grid.add_row(
            "replay",
            f"waiting {buffer['replay_depth']}  replayed {buffer['replayed_share']:.0%} of all "
            f"sampled, {_value(last, '.0%')} of the last batch  (use:groups "
            + "  ".join(f"{use}:{n}" for use, n in uses["counts"])
            + ")",
        )
    for label, figures in (("staleness", buffer["staleness"]),
                           ("trained on", buffer["sampled_staleness"])):  # fmt: skip
        histogram = "  ".join(f"{s}:{n}" for s, n in figures["counts"]) or "-"
        grid.add_row(
            label,
            f"p50 {figures['p50']}  p99 {figures['p99']}  max {figures['max']}  "
            f"({figures['total']} groups; staleness:groups {histogram})",
        )
    if learner.get("step") is not None:
        split = learner["time_split"]
        grid.add_row(
            "learner step",
            f"wait {split['wait_s']:.3f} s  fwd/bwd {split['compute_s']:.3f} s  publish "
            f"{split['publish_s']:.4f} s (recent mean); last step {learner['age_s']:.0f} s ago",
        )
        grid.add_row(
            "IS weights",
            f"mean {_value(learner.get('is_weight_mean'), '.3f')}  max "
            f"{_value(learner.get('is_weight_max'), '.2f')}  ESS "
            f"{_value(learner.get('is_ess'), '.3f')}  clipped "
            f"{_value(learner.get('clip_fraction'), '.2%')}",
        )
    return grid


def _actor_table(actors: list[dict]) -> Table:
    table = Table(title=f"actors ({len(actors)})", title_justify="left", box=box.SIMPLE_HEAD)
    columns = ("actor", "version", "lag", "tok/s", "idle", "groups", "bad", "restarts",
               "errors", "report")  # fmt: skip
    for name in columns:
        table.add_column(name, justify="left" if name == "actor" else "right", no_wrap=True)
    for a in actors:
        age = a["health_age_s"]
        table.add_row(
            a["actor_id"], _value(a["version"]), _value(a["version_lag"]),
            _value(a["tokens_per_s"], ".0f"), _value(a["idle_fraction"], ".0%"),
            str(a["groups_put"]), _bad(a), str(a["restarts"]), str(a["errors"]),
            "never" if age is None else f"{age:.0f}s ago",
            style="dim" if a["silent"] else None,
        )  # fmt: skip
    return table


def _bad(actor: dict) -> str:
    """Refused + quarantined groups, and whether its credential was revoked."""
    bad = str(actor["refused"] + actor["quarantined"])
    return f"{bad} revoked" if actor["revoked"] else bad


def _value(value: object, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)
