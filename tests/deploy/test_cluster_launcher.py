"""Ray's cluster launcher: every cluster YAML validates against the schema Ray ships, and
the on-premises path runs for real. An `sshd` of the test's own on 127.0.0.1:22 admits
this user with a generated key; `ray up -y` of deploy/ray/cluster-local.yaml with the head
on 127.0.0.1 syncs the project to ~/relay, runs its setup and starts Ray; `ray submit` of
deploy/ray/submit_run.py runs a short experiment (the learner moves to the node with the
`learning` resource); the run must have trained on rollouts; `ray down -y`.

The head is the only node: a worker in a network namespace of this machine would share
its /tmp/ray with the head, which two Ray nodes cannot (tests/deploy/test_compose.py gives
its worker a temp dir of its own instead); so the actor runs on the head too.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CLUSTERS = sorted((ROOT / "deploy" / "ray").glob("cluster-*.yaml"))
STEPS, BATCH = 4, 4


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_cluster_yaml_validates_against_rays_schema(path: Path) -> None:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cluster = yaml.safe_load(path.read_text())
    jsonschema.validate(cluster, schema)
    assert cluster["file_mounts"] == {"~/relay": "."}
    assert any("relay/.venv/bin" in command for command in cluster["setup_commands"])
    types = cluster.get("available_node_types", {})
    if types:  # the cloud YAMLs: generation and learning node types, placed by resources
        assert types["generation"]["resources"] == {"generation": 1}
        assert types["learning"]["resources"] == {"learning": 1}
    else:  # on premises: the head learns, the workers generate
        head, worker = (
            cluster["head_start_ray_commands"][-1],
            cluster["worker_start_ray_commands"][-1],
        )
        assert '{"learning":1}' in head and '{"generation":1}' in worker


def test_launcher_config_places_actors_and_learner_on_those_node_types() -> None:
    config = yaml.safe_load((ROOT / "configs" / "launcher.yaml").read_text())
    assert config["actors"]["resources"] == {"generation": 1}
    assert config["ray"]["learner_resources"] == {"learning": 1}


@pytest.fixture
def local_sshd(tmp_path: Path):
    """sshd on 127.0.0.1:22 that admits this user with a generated key; yields (user, key).

    This user's home is the head's: the test's Python lives there and must stay readable.
    What `ray up` leaves in it (~/relay, ~/.bashrc's PATH line, ~/ray_bootstrap_*) is
    removed or restored afterwards.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root: the test starts sshd on port 22 (Ray's local provider's port)")
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    assert Path(sshd).exists(), "sshd is missing: `make test` installs Debian's openssh-server"
    assert shutil.which("rsync"), "rsync is missing: `make test` installs it"
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 22)) == 0:
            pytest.skip("port 22 on 127.0.0.1 is taken (Ray's local provider connects there)")
    user = pwd.getpwuid(os.geteuid()).pw_name
    key, host_key = tmp_path / "id_ed25519", tmp_path / "host_ed25519"
    for path in (key, host_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(key.with_suffix(".pub").read_text())
    authorized.chmod(0o600)
    config = tmp_path / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\nPort 22\nHostKey {host_key}\nPidFile {tmp_path}/sshd.pid\n"
        f"AllowUsers {user}\nAuthorizedKeysFile {authorized}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "UsePAM no\nStrictModes no\nX11Forwarding no\nSubsystem sftp internal-sftp\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    home = Path.home()
    bashrc = home / ".bashrc"
    saved_bashrc = bashrc.read_bytes() if bashrc.exists() else None
    left_by_ray = [
        home / "relay",
        home / "ray_bootstrap_config.yaml",
        home / "ray_bootstrap_key.pem",
    ]
    assert not (home / "relay").exists(), f"{home / 'relay'} exists: the test would overwrite it"
    log = (tmp_path / "sshd.log").open("w")
    daemon = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stderr=log)
    try:
        login = ["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "BatchMode=yes",
                 "-o", "UserKnownHostsFile=/dev/null", f"{user}@127.0.0.1", "true"]  # fmt: skip
        for _ in range(50):
            if subprocess.run(login, capture_output=True, timeout=30).returncode == 0:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"cannot log in over SSH: {(tmp_path / 'sshd.log').read_text()}")
        yield user, key
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        log.close()
        for path in left_by_ray:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        if saved_bashrc is None:
            bashrc.unlink(missing_ok=True)
        else:
            bashrc.write_bytes(saved_bashrc)


@pytest.mark.slow
def test_ray_up_and_ray_submit_on_premises(local_sshd, warm_model_dir: Path, tmp_path: Path):
    user, key = local_sshd
    # The head's copy of the project gets this environment's venv, what `make setup` would
    # build there (3.7 GB of downloads), so that its setup command finds nothing to do.
    (Path.home() / "relay").mkdir()
    (Path.home() / "relay" / ".venv").symlink_to(BIN.parent)
    model = tmp_path / "models" / "tiny-warm"
    shutil.copytree(warm_model_dir, model)

    cluster = yaml.safe_load((ROOT / "deploy" / "ray" / "cluster-local.yaml").read_text())
    cluster["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    cluster["auth"] = {"ssh_user": user, "ssh_private_key": str(key)}
    cluster["cluster_name"] = f"relay-test-{os.getpid()}"
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump(cluster))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PATH"] = f"{BIN}:{env['PATH']}"

    def ray_cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip

    up = ray_cli("up", "-y", "--no-config-cache", str(cluster_file), timeout=600)
    try:
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
        submitted = ray_cli(
            "submit", "--no-config-cache", str(cluster_file), "deploy/ray/submit_run.py", "--",
            "-c", "configs/launcher.yaml", f"model.path={model}",
            # One CPU node: no GPUs, and the actors may run on the head too.
            "actors.num_gpus=0", "actors.resources={}", "actors.num_actors=1",
            "actors.group_size=4", "actors.groups_in_flight=4", "actors.sampling.max_tokens=6",
            "engine.max_model_len=64", "engine.kvcache_gib=1",
            "ray.learner_num_gpus=0", "learner.precision=fp32",
            f"learner.steps={STEPS}", f"learner.batch_groups={BATCH}", "learner.lr=1e-5",
            "eval.n_prompts=20", "eval.max_tokens=6", "dashboard.enabled=false",
            timeout=900,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stdout[-6000:] + submitted.stderr[-3000:]
        output = submitted.stdout + submitted.stderr
        assert "continues on the learner's node" in output
        assert "held-out accuracy after" in output
        run_dir = Path.home() / "relay" / "runs" / "launcher"
        results = json.loads((run_dir / "results.json").read_text())
        assert results["steps"] == STEPS and results["trained_groups"] == STEPS * BATCH
        assert results["actors"]["actor-0"]["groups"] >= STEPS * BATCH
    finally:
        down = ray_cli("down", "-y", str(cluster_file), timeout=300)
        assert down.returncode == 0, down.stderr[-3000:]
