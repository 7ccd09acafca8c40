"""The two-datacenter harness: its link delays and shapes, and it leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from benchmarks.netlab import ACTORS_NS, LEARNER_IP, LEARNER_NS, Link, two_datacenters

_SERVER = textwrap.dedent("""
    import socket
    server = socket.create_server(("0.0.0.0", 7777))
    while True:  # the proxy's readiness probe connects too, and sends nothing
        connection, _ = server.accept()
        if connection.recv(1) == b"?":
            connection.sendall(b"x" * 1_000_000)
        connection.close()
""")
_CLIENT = textwrap.dedent("""
    import socket, sys, time
    host, port = sys.argv[1].rsplit(":", 1)
    for _ in range(50):
        try:
            sock = socket.create_connection((host, int(port)), 2)
            break
        except OSError:
            time.sleep(0.1)
    started = time.monotonic()
    sock.sendall(b"?")
    first = sock.recv(65536)
    first_at = time.monotonic() - started
    got = len(first)
    while got < 1_000_000:
        got += len(sock.recv(1 << 20))
    print(first_at, time.monotonic() - started)
""")


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def test_the_link_delays_and_shapes_and_nothing_is_left_behind() -> None:
    link = Link(rtt_ms=200, mbit=20)
    with two_datacenters(link) as lab:
        assert {LEARNER_NS, ACTORS_NS} <= namespaces()
        lab.popen(LEARNER_NS, [sys.executable, "-c", _SERVER])
        address = lab.proxy(17777, 7777)
        client = subprocess.run(
            ["ip", "netns", "exec", ACTORS_NS, sys.executable, "-c", _CLIENT, address],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        first_byte_s, total_s = map(float, client.stdout.split())
        # A request and its first answer byte cross the link both ways: at least one RTT.
        assert first_byte_s >= 0.2
        # 1 MB at 20 Mbit/s takes at least 0.4 s, whatever the delay.
        assert total_s >= 0.4
        # The actors' side reaches nothing but the learner's side (no default route).
        routes = subprocess.run(["ip", "-n", ACTORS_NS, "route"], capture_output=True, text=True)
        assert "default" not in routes.stdout and LEARNER_IP.rsplit(".", 1)[0] in routes.stdout
        assert lab.emulation in ("netem", "proxy")  # delay asked for: never "none"
    assert not {LEARNER_NS, ACTORS_NS} & namespaces()
    veths = subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert "relay-dc" not in veths
