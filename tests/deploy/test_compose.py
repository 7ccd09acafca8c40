"""docker-compose.yml, checked as far as a machine without a Docker engine allows: every
file a service builds from, mounts or runs exists; then each service's command runs as a
local process with its own arguments, environment and health check. That is a real
two-node Ray cluster (`ray start --head` plus `ray start --address`), the `job` service's
`ray job submit` of `relay run` against the compose Redis, the dashboard, and Prometheus
scraping it. Grafana (no package for it here) is checked against the live metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.deploy.compose import ROOT, LocalService, clean_environment, load_compose, local_network
from tests.relay.dashboard_run import prometheus_samples

BIN = Path(sys.executable).parent
SECRETS = {
    "RELAY_REDIS_PASSWORD": "compose-redis-secret",
    "RELAY_RAY_TOKEN": "0123456789abcdef0123456789abcdef",
    "RELAY_DASHBOARD_TOKEN": "compose-dashboard-token",
}
RUNTIME_OUTPUTS = {"./models", "./runs"}
"""Bind mounts that `make demo` or the job service create."""
STEPS, BATCH = 4, 4


def test_every_service_builds_mounts_and_runs_files_that_exist() -> None:
    compose = load_compose(SECRETS)
    services = compose["services"]
    assert {"redis", "ray-head", "ray-worker", "job", "dashboard", "prometheus", "grafana"} <= set(
        services
    )
    for name, service in services.items():
        assert service.get("image") or service.get("build"), name
        if build := service.get("build"):
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert source in RUNTIME_OUTPUTS or (ROOT / source).exists(), (name, source)
            else:
                assert source in compose["volumes"], (name, source)
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, (name, dependency)
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)
        for published in service.get("ports", []):
            assert published.startswith("127.0.0.1:"), f"{name} publishes beyond loopback"
        if name != "job":
            assert "healthcheck" in service or name == "ray-worker", f"{name} has no health check"
    assert (ROOT / services["job"]["command"][0]).stat().st_mode & 0o111
    assert (ROOT / services["job"]["environment"]["RELAY_CONFIG"]).is_file()
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "--requirepass compose-redis-secret" in (
        redis_command
    )


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_copy_only_what_exists(dockerfile: str) -> None:
    text = (ROOT / "deploy" / "docker" / dockerfile).read_text()
    for source in re.findall(r"^COPY (.+) \S+$", text, flags=re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), f"{dockerfile} copies missing {path}"


def test_grafana_provisioning_points_at_the_dashboards_and_prometheus() -> None:
    compose = load_compose(SECRETS)
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    provisioning = ROOT / "deploy/grafana/provisioning"
    (datasource,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards/relay.yml").read_text())["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/relay.json").read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"], panel["title"]


@pytest.mark.slow
def test_compose_services_run_as_local_processes(warm_model_dir: Path, tmp_path: Path) -> None:
    compose = load_compose(SECRETS)
    network = local_network(compose)
    work = tmp_path / "relay"  # the image's WORKDIR: what the Dockerfile copies, plus models
    for part in ("configs", "deploy"):
        shutil.copytree(ROOT / part, work / part)
    shutil.copytree(warm_model_dir, work / "models" / "tiny-warm")
    prometheus_dir = tmp_path / "prometheus"
    prometheus_dir.mkdir()
    prometheus_config = tmp_path / "prometheus.yml"
    network.paths.update({
        "/relay/models": str(work / "models"),
        "/relay/runs": str(tmp_path / "runs"),
        "/prometheus": str(prometheus_dir),
        "/etc/prometheus/prometheus.yml": str(prometheus_config),
        "/bin/prometheus": shutil.which("prometheus") or "prometheus-is-missing",
    })  # fmt: skip
    prometheus_config.write_text(
        network.translate((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    )
    env = clean_environment(BIN)
    services = {
        name: LocalService(name, spec, network, env, cwd=work, log_dir=tmp_path / "logs")
        for name, spec in compose["services"].items()
    }
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    services["redis"].cwd = redis_dir  # the AOF goes to the working directory, as in /data
    # One machine, two Ray nodes: the worker needs a temp dir of its own (two machines
    # have one each); a short path, for Ray's socket names.
    worker_tmp = tempfile.mkdtemp(prefix="rayw", dir="/tmp")
    ray_env = services["ray-head"].environment
    try:
        services["redis"].start().wait_healthy()
        services["ray-head"].start().wait_healthy()
        services["ray-worker"].start(f"--temp-dir={worker_tmp}")
        services["dashboard"].start().wait_healthy()
        assert shutil.which("prometheus"), "prometheus is missing: `make setup` installs it"
        services["prometheus"].start().wait_healthy()

        job = services["job"].run(
            f"learner.steps={STEPS}", f"learner.batch_groups={BATCH}",
            "actors.group_size=4", "actors.groups_in_flight=4",
            "eval.n_prompts=20", "eval.every_steps=2", "eval.in_run_prompts=10", timeout=900,
        )  # fmt: skip
        assert job.returncode == 0, job.stdout[-5000:]
        assert "succeeded" in job.stdout and "held-out accuracy after" in job.stdout
        results = json.loads((tmp_path / "runs" / "compose" / "results.json").read_text())
        assert results["trained_groups"] == STEPS * BATCH
        assert sorted(results["actors"]) == ["actor-0", "actor-1"]

        exported = check_dashboard_metrics(network.ports[8420])
        check_prometheus_scraped(network.ports[9090])
        check_grafana_queries(exported)
    finally:
        for name in ("prometheus", "dashboard", "ray-worker", "ray-head", "redis"):
            services[name].stop()
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=ray_env, capture_output=True,
                       timeout=120)  # fmt: skip
        shutil.rmtree(worker_tmp, ignore_errors=True)


def check_dashboard_metrics(port: int) -> set[str]:
    """The compose dashboard saw the run in the compose Redis; returns the metric names."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics",
        headers={"Authorization": f"Bearer {SECRETS['RELAY_DASHBOARD_TOKEN']}"},
    )
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    samples = prometheus_samples(text)
    assert samples[("relay_buffer_acked_total", ())] == STEPS * BATCH
    assert samples[("relay_learner_step", ())] == STEPS
    assert {dict(labels)["actor"] for name, labels in samples if name == "relay_actor_version"} == {
        "actor-0", "actor-1"
    }  # fmt: skip
    return {name for name, _ in samples}


def check_prometheus_scraped(port: int) -> None:
    """Prometheus scraped the dashboard with the token and holds the run's figures."""
    query = urllib.parse.urlencode({"query": "relay_buffer_acked_total"})
    deadline = time.monotonic() + 60
    while True:
        reply = json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{query}", timeout=10)
            .read()
            .decode()
        )
        values = [float(r["value"][1]) for r in reply["data"]["result"]]
        if values == [STEPS * BATCH]:
            return
        assert time.monotonic() < deadline, f"Prometheus has {reply}"
        time.sleep(2)


def check_grafana_queries(exported: set[str]) -> None:
    """Every metric the Grafana dashboard queries is one the dashboard exports."""
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/relay.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\brelay_[a-z_]+", target["expr"])
    }
    assert queried and queried <= exported, queried - exported
