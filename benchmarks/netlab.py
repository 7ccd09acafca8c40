"""Two datacenters on one machine: network namespaces joined by a shaped link.

`two_datacenters(link)` creates namespace `relay-dc-learner` (the learner and its Redis)
and `relay-dc-actors` (an actor pool), joined by one veth pair with link-local
addresses (169.254.231.1 and .2). Nothing else is routed: all traffic stays between the
two. On exit, normal or not, both namespaces (and with them the veth pair and every
process started inside through `Lab.popen`) are removed.

The link:
- **bandwidth** in the kernel: a `tbf` qdisc on each end of the veth pair;
- **delay and loss**: `netem` where the kernel has it; otherwise (these machines: "Specified
  qdisc kind is unknown") a userspace TCP proxy in the actors' namespace (`Lab.proxy`)
  delays every byte by half the RTT in each direction and models loss as TCP's recovery
  from it: each 1,448-byte segment is lost with probability `loss` and then arrives one
  RTT late, holding back everything behind it (in-order delivery). That is fast
  retransmit's cost, not congestion control's: the kernel's own TCP runs over the veth
  at sub-millisecond RTT and never halves its window, so losses here cost less than on
  a real long link. `Lab.emulation` says which one produced a figure;
- **blackout**: the veth pair set down and up again (`Lab.blackout`): the kernel drops
  every packet and the TCP connections ride it out, or time out, as they would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

LEARNER_NS, ACTORS_NS = "relay-dc-learner", "relay-dc-actors"
LEARNER_IP, ACTORS_IP = "169.254.231.1", "169.254.231.2"
_VETH = ("relay-dcl", "relay-dca")
_SEGMENT = 1448
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Link:
    rtt_ms: float = 0.0
    mbit: float | None = None
    """None: not shaped."""
    loss: float = 0.0

    @property
    def label(self) -> str:
        rate = "unshaped" if self.mbit is None else f"{self.mbit:g} Mbit/s"
        return f"{self.rtt_ms:g} ms, {rate}, {self.loss:.0%} loss"


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, capture_output=True, text=True)


def has_netem() -> bool:
    """Whether this kernel has netem (tried on a throwaway namespace's loopback)."""
    name = "relay-netem-probe"
    try:
        _run("ip", "netns", "add", name)
        probe = subprocess.run(
            ["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
             "delay", "1ms"], capture_output=True,
        )  # fmt: skip
        return probe.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


@dataclass
class Lab:
    link: Link
    emulation: str
    """What delays and drops: "netem" (kernel), "proxy" (userspace, see module doc), or
    "none" (no delay and no loss asked for)."""
    processes: list[subprocess.Popen] = field(default_factory=list)

    def popen(self, namespace: str, command: list[str], **kwargs: object) -> subprocess.Popen:
        """Start `command` inside `namespace`; it is stopped when the lab closes."""
        process = subprocess.Popen(["ip", "netns", "exec", namespace, *command], **kwargs)
        self.processes.append(process)
        return process

    def proxy(self, port: int, target_port: int) -> str:
        """host:port in the actors' namespace that reaches LEARNER_IP:target_port over the
        link, through the delay/loss proxy (or directly where netem does that)."""
        if self.emulation != "proxy":
            return f"{LEARNER_IP}:{target_port}"
        self.popen(ACTORS_NS, [
            sys.executable, "-m", "benchmarks.netlab", "proxy", "--listen", f"127.0.0.1:{port}",
            "--to", f"{LEARNER_IP}:{target_port}", "--rtt-ms", str(self.link.rtt_ms),
            "--loss", str(self.link.loss),
        ], cwd=ROOT)  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = subprocess.run(
                ["ip", "netns", "exec", ACTORS_NS, sys.executable, "-c",
                 f"import socket; socket.create_connection(('127.0.0.1', {port}), 1).close()"],
                capture_output=True,
            )  # fmt: skip
            if probe.returncode == 0:
                return f"127.0.0.1:{port}"
            time.sleep(0.2)
        raise RuntimeError("the link proxy did not start")

    def blackout(self, seconds: float) -> None:
        """Cut the link for `seconds` (both ends down), then restore it."""
        _run("ip", "-n", LEARNER_NS, "link", "set", _VETH[0], "down")
        try:
            time.sleep(seconds)
        finally:
            _run("ip", "-n", LEARNER_NS, "link", "set", _VETH[0], "up")
            _run("ip", "-n", ACTORS_NS, "link", "set", _VETH[1], "up")


@contextlib.contextmanager
def two_datacenters(link: Link) -> Iterator[Lab]:
    """The two namespaces and their link; everything is removed on exit."""
    remove_leftovers()
    emulation = "none" if not (link.rtt_ms or link.loss) else "netem" if has_netem() else "proxy"
    lab = Lab(link, emulation)
    try:
        _run("ip", "netns", "add", LEARNER_NS)
        _run("ip", "netns", "add", ACTORS_NS)
        _run("ip", "link", "add", _VETH[0], "netns", LEARNER_NS, "type", "veth",
             "peer", "name", _VETH[1], "netns", ACTORS_NS)  # fmt: skip
        for namespace, device, address in ((LEARNER_NS, _VETH[0], LEARNER_IP),
                                           (ACTORS_NS, _VETH[1], ACTORS_IP)):  # fmt: skip
            _run("ip", "-n", namespace, "addr", "add", f"{address}/30", "dev", device)
            _run("ip", "-n", namespace, "link", "set", device, "up")
            _run("ip", "-n", namespace, "link", "set", "lo", "up")
            _shape(namespace, device, link, emulation)
        yield lab
    finally:
        for process in lab.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in lab.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        remove_leftovers()


def remove_leftovers() -> None:
    """Kill what runs in the lab's namespaces and delete them (after a crash too)."""
    for namespace in (LEARNER_NS, ACTORS_NS):
        pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
        for pid in pids.stdout.split():
            subprocess.run(["kill", "-9", pid], capture_output=True)
        subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)


def _shape(namespace: str, device: str, link: Link, emulation: str) -> None:
    tc = ["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device]
    if emulation == "netem" and (link.rtt_ms or link.loss):
        netem = ["netem", "delay", f"{link.rtt_ms / 2:g}ms", "loss", f"{100 * link.loss:g}%"]
        if link.mbit is not None:
            netem += ["rate", f"{link.mbit:g}mbit"]
        _run(*tc, "root", *netem)
    elif link.mbit is not None:
        burst = max(32 * 1024, int(link.mbit * 1e6 / 8 * 0.004))  # 4 ms at the rate
        _run(*tc, "root", "tbf", "rate", f"{link.mbit:g}mbit", "burst", str(burst),
             "latency", "100ms")  # fmt: skip


# -- the delay/loss proxy (runs inside the actors' namespace) ---------------------------------
async def _forward(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, one_way_s: float,
    rtt_s: float, loss: float, rng: random.Random,
) -> None:  # fmt: skip
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    async def take() -> None:
        while data := await reader.read(65536):
            segments = -(-len(data) // _SEGMENT)
            lost = sum(rng.random() < loss for _ in range(segments)) if loss else 0
            await queue.put((loop.time() + one_way_s + lost * rtt_s, data))
        await queue.put((0.0, b""))

    async def give() -> None:
        last = 0.0
        while True:
            release, data = await queue.get()
            if not data:
                break
            last = max(release, last)  # in order: a late segment holds back what follows
            if (wait := last - loop.time()) > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(take(), give())
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _proxy(listen: str, to: str, rtt_ms: float, loss: float) -> None:
    host, port = listen.rsplit(":", 1)
    target_host, target_port = to.rsplit(":", 1)
    rng = random.Random(0)
    one_way, rtt = rtt_ms / 2000, rtt_ms / 1000

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(target_host, int(target_port))
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            _forward(reader, up_writer, one_way, rtt, loss, rng),
            _forward(up_reader, writer, one_way, rtt, loss, rng),
        )

    server = await asyncio.start_server(connection, host, int(port))
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    proxy = commands.add_parser("proxy", help="delay and drop between two TCP endpoints")
    proxy.add_argument("--listen", required=True)
    proxy.add_argument("--to", required=True)
    proxy.add_argument("--rtt-ms", type=float, default=0.0)
    proxy.add_argument("--loss", type=float, default=0.0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_proxy(args.listen, args.to, args.rtt_ms, args.loss))


if __name__ == "__main__":
    main()
