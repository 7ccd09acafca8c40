"""Deployment files, checked statically (no Docker engine runs where these tests run)."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_test_command_from_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    assert "make test" in readme.split("\n## ")[0]
    assert "make test" in (REPO / ".ci/run").read_text()


def test_kuberay_rayjob_runs_relay_against_the_redis_deployment() -> None:
    documents = [
        doc
        for path in sorted((REPO / "deploy/k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    ]
    by_kind = {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents}
    job = by_kind[("RayJob", "relay-run")]
    assert job["apiVersion"] == "ray.io/v1"
    entrypoint = job["spec"]["entrypoint"].split()
    assert entrypoint[:2] == ["relay", "run"]
    assert (REPO / entrypoint[entrypoint.index("-c") + 1]).is_file()
    # The buffer URL names the Service of the Redis deployment, password from its Secret.
    url = next(arg for arg in entrypoint if arg.startswith("buffer.url="))
    assert "@relay-redis:6379" in url and "${REDIS_PASSWORD}" in url
    assert ("Service", "relay-redis") in by_kind
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and any(e["name"] == "REDIS_PASSWORD" for e in head["env"])
    workers = cluster["workerGroupSpecs"]
    assert workers and all(w["replicas"] >= w["minReplicas"] for w in workers)
    redis = by_kind[("Deployment", "relay-redis")]["spec"]["template"]["spec"]["containers"][0]
    assert "--appendonly" in redis["args"] and "--requirepass" in redis["args"]
