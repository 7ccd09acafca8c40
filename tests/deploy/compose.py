"""Running docker-compose.yml's services as local processes, for a machine without a Docker
engine: each service's command and environment as the compose file gives them, with the
service host names pointing at 127.0.0.1, each published port moved to a free one (all
services share one network namespace here), and container paths mapped to the files and
directories the compose file mounts there."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from buffer.server import free_port

ROOT = Path(__file__).resolve().parents[2]
_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?::-([^}]*))?\}")


def load_compose(variables: dict[str, str]) -> dict:
    """docker-compose.yml with `${VAR:-default}` interpolated as compose does (`$$` is a
    literal `$`, left for the container's shell)."""
    text = (ROOT / "docker-compose.yml").read_text()
    return yaml.safe_load(_VARIABLE.sub(_interpolate(variables), text))


def _interpolate(variables: dict[str, str]):
    def value(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return variables.get(match.group(1), match.group(2) or "")

    return value


@dataclass
class LocalNetwork:
    """Where compose's host names, ports and container paths are on this machine."""

    hosts: list[str]
    ports: dict[int, int]
    paths: dict[str, str] = field(default_factory=dict)
    """Container path -> local path (mounts, and binaries of images that are not Relay's)."""

    def translate(self, text: str) -> str:
        for container, local in sorted(self.paths.items(), key=lambda kv: -len(kv[0])):
            text = re.sub(rf"(?<![\w/.-]){re.escape(container)}(?=[/\s\"']|$)", local, text)
        hosts = "|".join(re.escape(h) for h in self.hosts)
        text = re.sub(rf"(?<![\w.-])({hosts})(?=:\d)", "127.0.0.1", text)
        ports = "|".join(str(p) for p in self.ports)
        return re.sub(rf"(?<!\d)({ports})(?!\d)", lambda m: str(self.ports[int(m.group(1))]), text)


def local_network(compose: dict) -> LocalNetwork:
    ports = {6379, 6380, 8265}
    for service in compose["services"].values():
        for published in service.get("ports", []):
            ports.add(int(published.rsplit(":", 1)[1]))
    return LocalNetwork(hosts=list(compose["services"]), ports={p: free_port() for p in ports})


@dataclass
class LocalService:
    """One compose service as a process: its command, environment and health check."""

    name: str
    spec: dict
    network: LocalNetwork
    base_env: dict[str, str]
    cwd: Path
    log_dir: Path
    process: subprocess.Popen | None = None

    @property
    def environment(self) -> dict[str, str]:
        env = dict(self.base_env)
        for key, value in (self.spec.get("environment") or {}).items():
            env[key] = self.network.translate(str(value))
        return env

    @property
    def argv(self) -> list[str]:
        command = self.spec.get("entrypoint") or self.spec["command"]
        if isinstance(command, str):
            command = ["/bin/sh", "-c", command]
        return [self.network.translate(str(arg)) for arg in command]

    def run(self, *extra: str, timeout: float) -> subprocess.CompletedProcess:
        """Run to completion (a one-shot service such as `job`)."""
        with self._log("w") as out:
            done = subprocess.run(
                [*self.argv, *extra], cwd=self.cwd, env=self.environment, stdout=out,
                stderr=subprocess.STDOUT, timeout=timeout,
            )  # fmt: skip
        return subprocess.CompletedProcess(done.args, done.returncode, self.log(), "")

    def start(self, *extra: str) -> LocalService:
        with self._log("w") as out:
            self.process = subprocess.Popen([*self.argv, *extra], cwd=self.cwd,
                                            env=self.environment, stdout=out,
                                            stderr=subprocess.STDOUT)  # fmt: skip
        return self

    def wait_healthy(self, timeout: float = 120) -> None:
        """Poll the service's own health check, translated, until it passes."""
        test = self.spec["healthcheck"]["test"]
        argv = ["/bin/sh", "-c", test[1]] if test[0] == "CMD-SHELL" else test[1:]
        argv = [self.network.translate(arg) for arg in argv]
        assert shutil.which(argv[0], path=self.environment["PATH"]), f"{self.name}: needs {argv[0]}"
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited:\n{self.log()[-3000:]}")
            check = subprocess.run(argv, env=self.environment, capture_output=True, timeout=60)
            if check.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not healthy: {check.stderr[-2000:]!r}")
            time.sleep(1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return (self.log_dir / f"{self.name}.log").read_text(errors="replace")

    def _log(self, mode: str):
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return (self.log_dir / f"{self.name}.log").open(mode)


def clean_environment(bin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"  # `relay` and `ray` of this environment
    return env
