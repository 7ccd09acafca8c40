"""The dashboard's figures, `/metrics`, the event stream, the token and `relay status`,
against a real buffer filled with a run whose figures are known."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from buffer.replay_buffer import ReplayBuffer
from buffer.telemetry import Telemetry
from relay.cli import main
from relay.dashboard.config import DashboardConfig
from relay.dashboard.server import Dashboard
from relay.dashboard.snapshot import Watcher
from tests.relay.dashboard_run import (
    ACTOR_HEALTH,
    LEARNER_STEPS,
    READY_STALENESS,
    SAMPLED_STALENESS,
    fill_known_run,
    prometheus_samples,
)


@pytest.fixture
def known_buffer(make_buffer) -> ReplayBuffer:
    buffer = make_buffer(max_staleness=3)
    fill_known_run(buffer)
    return buffer


@pytest.fixture
def dashboard(known_buffer: ReplayBuffer) -> Iterator[Dashboard]:
    served = Dashboard(Watcher(known_buffer), DashboardConfig(port=0, refresh_s=0.2)).start()
    yield served
    served.stop()


def get(url: str, headers: dict | None = None) -> tuple[int, str, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


def test_snapshot_of_a_known_run(known_buffer: ReplayBuffer) -> None:
    snapshot = Watcher(known_buffer).poll()
    buffer = snapshot["buffer"]
    assert buffer["learner_version"] == 5
    assert (buffer["depth"], buffer["claimed"]) == (3, 1)
    assert dict(map(tuple, buffer["staleness"]["counts"])) == READY_STALENESS
    # Ready {0: 2, 1: 1}: half the groups are at 0, 99% at or below 1. The claimed group
    # (staleness 1) is not among them.
    assert (buffer["staleness"]["p50"], buffer["staleness"]["p99"]) == (0, 1)
    assert buffer["staleness"]["max"] == 1
    assert dict(map(tuple, buffer["sampled_staleness"]["counts"])) == SAMPLED_STALENESS
    assert buffer["lost_work"]["dropped_stale"] == 1
    assert buffer["counters"]["acked"] == 2

    actors = {row["actor_id"]: row for row in snapshot["actors"]}
    assert sorted(actors) == ["actor-0", "actor-1"]
    for actor_id, health in ACTOR_HEALTH.items():
        for field in ("version", "version_lag", "tokens_per_s", "idle_fraction", "restarts",
                      "weight_bytes_per_s", "last_weight_fetch_s"):  # fmt: skip
            assert actors[actor_id][field] == health[field]
        assert actors[actor_id]["groups_put"] == 4 if actor_id == "actor-0" else 3
        assert (actors[actor_id]["refused"], actors[actor_id]["revoked"]) == (0, False)
        assert not actors[actor_id]["silent"]
    assert actors["actor-0"]["last_error"] == "engine died: boom"

    learner = snapshot["learner"]
    assert learner["step"] == 4
    assert learner["time_split"] == pytest.approx(
        {"wait_s": 0.2, "compute_s": 0.6, "publish_s": 0.2}
    )
    assert learner["idle_fraction"] == pytest.approx(0.2)
    assert (learner["accuracy"], learner["accuracy_step"]) == (0.375, 2)
    assert learner["is_weight_max"] == 5.5
    assert [r["step"] for r in snapshot["learner_history"]] == [1, 2, 3, 4]


def test_learner_history_is_merged_without_repeats(known_buffer: ReplayBuffer) -> None:
    watcher = Watcher(known_buffer)
    watcher.poll()
    # A resumed learner repeats step numbers; records are told apart by their time.
    for step, stamp in ((4, 1010.0), (5, 1011.0)):
        Telemetry.beside(known_buffer).record_metrics(
            "learner", {**LEARNER_STEPS[-1], "step": step, "time": stamp}
        )
    snapshot = watcher.poll()
    assert [r["step"] for r in snapshot["learner_history"]] == [1, 2, 3, 4, 4, 5]
    assert [r["step"] for r in watcher.snapshot(history_since=1004.0)["learner_history"]] == [4, 5]
    assert len(snapshot["series"]) == 2


def test_metrics_endpoint_parses_with_the_prometheus_parser(dashboard: Dashboard) -> None:
    status, text, headers = get(dashboard.url + "metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = prometheus_samples(text)
    assert samples[("relay_buffer_depth_groups", ())] == 3
    assert samples[("relay_learner_version", ())] == 5
    # Cumulative buckets of the ready groups' staleness {0: 2, 1: 1}.
    assert samples[("relay_buffer_staleness_bucket", (("le", "0"),))] == 2
    assert samples[("relay_buffer_staleness_bucket", (("le", "1"),))] == 3
    assert samples[("relay_buffer_staleness_bucket", (("le", "+Inf"),))] == 3
    # Sampled {1: 1, 2: 2}.
    assert samples[("relay_buffer_sampled_staleness_bucket", (("le", "0"),))] == 0
    assert samples[("relay_buffer_sampled_staleness_bucket", (("le", "1"),))] == 1
    assert samples[("relay_buffer_sampled_staleness_bucket", (("le", "2"),))] == 3
    assert samples[("relay_buffer_sampled_staleness_sum", ())] == 1 + 2 * 2
    assert samples[("relay_buffer_claimed_groups", ())] == 1
    assert samples[("relay_buffer_dropped_stale_total", ())] == 1
    assert samples[("relay_actor_version_lag", (("actor", "actor-0"),))] == 1
    assert samples[("relay_actor_restarts_total", (("actor", "actor-0"),))] == 2
    assert samples[("relay_actor_tokens_per_s", (("actor", "actor-1"),))] == 98.0
    assert samples[("relay_learner_idle_fraction", ())] == pytest.approx(0.2)
    assert samples[("relay_learner_step_seconds", (("phase", "wait"),))] == pytest.approx(0.2)
    assert samples[("relay_learner_accuracy", ())] == 0.375


def test_event_stream_sends_history_once_then_only_new_steps(
    dashboard: Dashboard, known_buffer: ReplayBuffer
) -> None:
    with urllib.request.urlopen(dashboard.url + "api/events", timeout=10) as stream:
        events = (json.loads(line[6:]) for line in stream if line.startswith(b"data: "))
        first = next(events)
        assert [r["step"] for r in first["learner_history"]] == [1, 2, 3, 4]
        assert first["actors"][0]["actor_id"] == "actor-0"
        Telemetry.beside(known_buffer).record_metrics(
            "learner", {**LEARNER_STEPS[-1], "step": 5, "time": 1005.0}
        )
        for event in events:
            if event["learner_history"]:
                assert [r["step"] for r in event["learner_history"]] == [5]
                break


def test_token_is_required_on_every_route(known_buffer: ReplayBuffer) -> None:
    config = DashboardConfig(port=0, token="s3cret")
    with_token = Dashboard(Watcher(known_buffer), config).start()
    try:
        for route in ("", "metrics", "api/snapshot", "static/app.js"):
            status, body, _ = get(with_token.url + route)
            assert status == 401 and "token" in body
        assert get(with_token.url + "metrics", {"Authorization": "Bearer wrong"})[0] == 401
        assert get(with_token.url + "metrics", {"Authorization": "Bearer s3cret"})[0] == 200
        status, _, headers = get(with_token.url + "?token=s3cret")
        assert status == 200 and "relay_dashboard_token=s3cret" in headers["set-cookie"]
        cookie = {"Cookie": "relay_dashboard_token=s3cret"}
        assert get(with_token.url + "api/snapshot", cookie)[0] == 200
    finally:
        with_token.stop()


def test_binding_beyond_loopback_generates_a_token(
    known_buffer: ReplayBuffer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RELAY_DASHBOARD_TOKEN", raising=False)
    exposed = Dashboard(Watcher(known_buffer), DashboardConfig(host="0.0.0.0", port=0)).start()
    try:
        assert exposed.token
        assert get(exposed.url + "metrics")[0] == 401
        assert get(exposed.url + f"metrics?token={exposed.token}")[0] == 200
    finally:
        exposed.stop()


def test_relay_status_json_and_table(
    known_buffer: ReplayBuffer, redis_server, capsys: pytest.CaptureFixture
) -> None:
    watch = ["--buffer", redis_server.url, "--prefix", known_buffer.config.key_prefix]
    assert main(["status", "--json", *watch]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["buffer"]["staleness"]["max"] == 1
    assert record["learner"]["idle_fraction"] == pytest.approx(0.2)
    assert "learner_history" not in record
    assert main(["status", *watch]) == 0
    table = capsys.readouterr().out
    assert "actor-0" in table and "engine died: boom" in table and "0:2  1:1" in table
    assert (
        "actor-0 weights: 12.5 MB/s, last fetch 0.25s, 1 versions behind" in table
    )  # actor-0's weight link


def test_relay_status_without_a_buffer_says_where_to_point_it(
    capsys: pytest.CaptureFixture, tmp_path
) -> None:
    assert main(["status", f"run_dir={tmp_path}"]) == 1
    assert "--buffer redis://" in capsys.readouterr().err


def test_relay_status_and_the_snapshot_show_replay(
    make_buffer, redis_server, capsys: pytest.CaptureFixture
) -> None:
    from relay.dashboard.prometheus import exposition
    from tests.buffer.factories import versioned_group

    buffer = make_buffer(replay=2)
    buffer.put([versioned_group(f"g{i}", 0) for i in range(3)], "actor-0")
    buffer.ack(buffer.sample(2))  # two fresh uses, both offered again
    buffer.ack(buffer.sample(2))  # the last fresh group (offered again) and a last use
    Telemetry.beside(buffer).record_metrics("learner", {
        "step": 2, "time": 1.0, "learner/replayed_fraction": 0.5,
    })  # fmt: skip
    snapshot = Watcher(buffer).poll()
    figures = snapshot["buffer"]
    assert (figures["depth"], figures["replay_depth"], figures["claimed"]) == (0, 2, 0)
    assert dict(map(tuple, figures["uses"]["counts"])) == {1: 3, 2: 1}
    assert figures["replayed_share"] == pytest.approx(0.25)
    assert snapshot["learner"]["replayed_fraction"] == 0.5
    metrics = exposition(snapshot).decode()
    assert "relay_buffer_replay_groups 2.0" in metrics
    assert "relay_learner_replayed_fraction 0.5" in metrics
    watch = ["--buffer", redis_server.url, "--prefix", buffer.config.key_prefix]
    assert main(["status", *watch]) == 0
    table = capsys.readouterr().out
    assert "waiting 2  replayed 25% of all sampled, 50% of the last batch" in table
    assert "use:groups 1:3  2:1" in table
