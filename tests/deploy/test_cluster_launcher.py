"""Ray's cluster launcher: every cluster YAML validates against the schema Ray ships, and
the on-premises path runs for real. This machine is the head and a network namespace
(with mount and PID namespaces of its own) the worker, each with an `sshd` of the test's
own that admits this user with a generated key. `ray up -y` of deploy/ray/cluster-local.yaml
syncs the project, runs its setup and starts Ray on both; `ray submit` of
deploy/ray/submit_run.py runs a short experiment whose learner moves to the `learning`
node (the head) and whose actor runs on the `generation` node (the worker); the run must
have trained on rollouts; `ray down -y`.
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
import warnings
from dataclasses import dataclass
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
    assert cluster["file_mounts"] == {"~/relay": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    assert any("relay/.venv/bin" in c and "RAY_AUTH_MODE=token" in c
               for c in cluster["setup_commands"])  # fmt: skip
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


VETH_IP, WORKER_IP, NAMESPACE = "10.231.0.1", "10.231.0.2", "relay-worker"


def machine_ip() -> str:
    """This machine's own address: the one Ray registers its node under."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("10.255.255.255", 1))  # no packet is sent; picks the route
        return probe.getsockname()[0]


@dataclass
class Machines:
    """Where `ray up` finds the nodes, and how it logs in."""

    user: str
    key: Path
    head_ip: str
    worker_ips: list[str]


def write_sshd_config(tmp_path: Path, name: str, address: str, user: str, key: Path) -> Path:
    host_key = tmp_path / f"host-{name}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    config = tmp_path / f"sshd-{name}.conf"
    config.write_text(
        f"ListenAddress {address}\nPort 22\nHostKey {host_key}\nPidFile {tmp_path}/{name}.pid\n"
        f"AllowUsers {user}\nAuthorizedKeysFile {key}.pub\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "UsePAM no\nStrictModes no\nX11Forwarding no\nSubsystem sftp internal-sftp\n"
    )
    return config


def wait_for_login(user: str, key: Path, address: str, log: Path) -> None:
    login = ["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "BatchMode=yes",
             "-o", "UserKnownHostsFile=/dev/null", f"{user}@{address}", "true"]  # fmt: skip
    for _ in range(50):
        if subprocess.run(login, capture_output=True, timeout=30).returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"cannot log in to {address} over SSH: {log.read_text()}")


def start_worker_machine(tmp_path: Path, sshd: str, user: str, key: Path) -> subprocess.Popen:
    """A second machine: network, mount and PID namespaces of its own (a Ray node needs its
    own /tmp/ray, and `ray stop` there must not see the head's processes), reached over a
    veth pair, with its own sshd."""
    ip = ["ip", "netns", "exec", NAMESPACE, "ip"]
    for command in (
        ["ip", "netns", "add", NAMESPACE],
        ["ip", "link", "add", "relay-h", "type", "veth", "peer", "name", "relay-w"],
        ["ip", "link", "set", "relay-w", "netns", NAMESPACE],
        ["ip", "addr", "add", f"{VETH_IP}/24", "dev", "relay-h"],
        ["ip", "link", "set", "relay-h", "up"],
        [*ip, "addr", "add", f"{WORKER_IP}/24", "dev", "relay-w"],
        [*ip, "link", "set", "relay-w", "up"],
        [*ip, "link", "set", "lo", "up"],
        [*ip, "route", "add", "default", "via", VETH_IP],
    ):
        subprocess.run(command, check=True, capture_output=True)
    private_ray = tmp_path / "worker-tmp-ray"
    private_ray.mkdir(mode=0o777)
    config = write_sshd_config(tmp_path, "worker", WORKER_IP, user, key)
    log = tmp_path / "sshd-worker.log"
    inside = f"mount --bind {private_ray} /tmp/ray && exec {sshd} -D -e -f {config}"
    # sshd is the namespace's first process: when it ends, everything started there ends.
    return subprocess.Popen(
        ["ip", "netns", "exec", NAMESPACE, "unshare", "--mount", "--pid", "--fork",
         "--kill-child=SIGKILL", "--mount-proc", "--propagation", "private", "sh", "-c", inside],
        stderr=log.open("w"),
    )  # fmt: skip


@pytest.fixture
def machines(tmp_path: Path):
    """This machine as the head (sshd for this user, a generated key) and, when network
    namespaces can be made, a worker machine beside it; yields `Machines`.

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
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    Path("/run/sshd").mkdir(exist_ok=True)
    home = Path.home()
    assert not (home / "relay").exists(), f"{home / 'relay'} exists: the test would overwrite it"
    bashrc = home / ".bashrc"
    saved_bashrc = bashrc.read_bytes() if bashrc.exists() else None
    # The cluster's token (cluster-local.yaml copies it to every node), as a user makes it.
    token = home / ".ray" / "auth_token"
    made_token = not token.exists()
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True,
                   capture_output=True)  # fmt: skip
    daemons: list[subprocess.Popen] = []
    try:
        try:
            daemons.append(start_worker_machine(tmp_path, sshd, user, key))
            # The head at this machine's own address, the one Ray registers it under; the
            # worker reaches it through the veth pair and its default route.
            head_ip, worker_ips = machine_ip(), [WORKER_IP]
        except (subprocess.CalledProcessError, FileNotFoundError) as error:
            warnings.warn(f"no network namespace for a worker ({error}): the head runs alone",
                          stacklevel=1)  # fmt: skip
            head_ip, worker_ips = "127.0.0.1", []
        head_log = tmp_path / "sshd-head.log"
        head_config = write_sshd_config(tmp_path, "head", head_ip, user, key)
        daemons.append(subprocess.Popen([sshd, "-D", "-e", "-f", str(head_config)],
                                        stderr=head_log.open("w")))  # fmt: skip
        wait_for_login(user, key, head_ip, head_log)
        for worker_ip in worker_ips:
            wait_for_login(user, key, worker_ip, tmp_path / "sshd-worker.log")
        yield Machines(user, key, head_ip, worker_ips)
    finally:
        for daemon in daemons:
            daemon.kill()  # the worker's: its namespace's processes go with it (--kill-child)
            daemon.wait(timeout=30)
        subprocess.run(["ip", "netns", "delete", NAMESPACE], capture_output=True)
        for name in ("relay", "ray_bootstrap_config.yaml", "ray_bootstrap_key.pem"):
            path = home / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        if made_token:
            token.unlink(missing_ok=True)
        if saved_bashrc is None:
            bashrc.unlink(missing_ok=True)
        else:
            bashrc.write_bytes(saved_bashrc)


@pytest.mark.slow
def test_ray_up_and_ray_submit_on_premises(machines: Machines, warm_model_dir: Path, tmp_path):
    # The head's copy of the project gets this environment's venv, what `make setup` would
    # build there (3.7 GB of downloads), so that its setup command finds nothing to do. The
    # worker shares this file system, as nodes with a shared home directory do.
    (Path.home() / "relay").mkdir()
    (Path.home() / "relay" / ".venv").symlink_to(BIN.parent)
    model = tmp_path / "models" / "tiny-warm"
    shutil.copytree(warm_model_dir, model)

    cluster = yaml.safe_load((ROOT / "deploy" / "ray" / "cluster-local.yaml").read_text())
    cluster["provider"].update(head_ip=machines.head_ip, worker_ips=machines.worker_ips)
    cluster["auth"] = {"ssh_user": machines.user, "ssh_private_key": str(machines.key)}
    cluster["cluster_name"] = f"relay-test-{os.getpid()}"
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump(cluster))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PATH"] = f"{BIN}:{env['PATH']}"
    # Ray 2.60's default autoscaler (v2) never starts the local provider's listed workers
    # (seen here: the head only); v1 does. deploy/ray/cluster-local.yaml says so.
    env["RAY_UP_enable_autoscaler_v2"] = "0"

    def ray_cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip

    up = ray_cli("up", "-y", "--no-config-cache", str(cluster_file), timeout=600)
    try:
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
        submitted = ray_cli(
            "submit", "--no-config-cache", str(cluster_file), "deploy/ray/submit_run.py", "--",
            "-c", "configs/launcher.yaml", f"model.path={model}",
            # CPU nodes; without a worker machine the actor runs on the head.
            "actors.num_gpus=0", "actors.num_actors=1",
            *([] if machines.worker_ips else ["actors.resources={}"]),
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
        if machines.worker_ips:  # the actor needs `generation`: only the worker machine has it
            assert results["actors"]["actor-0"]["node_ip"] == WORKER_IP
        assert results["steps"] == STEPS and results["trained_groups"] == STEPS * BATCH
        assert results["actors"]["actor-0"]["groups"] >= STEPS * BATCH
    finally:
        down = ray_cli("down", "-y", str(cluster_file), timeout=300)
        assert down.returncode == 0, down.stderr[-3000:]
