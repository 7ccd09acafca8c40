"""The buffer over TLS (`rediss://`) against a real redis-server with a self-signed certificate."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from buffer.config import BufferConfig
from buffer.replay_buffer import ReplayBuffer
from buffer.server import RedisServerError, free_port, reach
from tests.buffer.factories import versioned_group

PASSWORD = "tls-test-password"


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key (it is its own CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """redis-server speaking TLS only, with a password; yields its port and certificate."""
    cert, key = self_signed(tmp_path)
    port = free_port()
    process = subprocess.Popen(
        [shutil.which("redis-server"), "--port", "0", "--tls-port", str(port),
         "--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
         "--requirepass", PASSWORD, "--dir", str(tmp_path), "--appendonly", "no",
         "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    deadline = time.monotonic() + 20
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server with TLS did not start"
            time.sleep(0.05)
    yield port, cert
    process.kill()
    process.wait()


def test_the_buffer_works_over_tls_with_a_verified_certificate(tls_server) -> None:
    port, cert = tls_server
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={cert}&ssl_cert_reqs=required"
    buffer = ReplayBuffer(reach(url), BufferConfig(key_prefix="tls"))
    buffer.put([versioned_group(f"g{i}", 0) for i in range(3)], "actor")
    batch = buffer.sample(3)
    assert buffer.ack(batch).acked == 3


def test_an_unverifiable_certificate_or_plain_text_is_refused(tls_server) -> None:
    port, _ = tls_server
    # No CA given: the self-signed certificate cannot be verified.
    with pytest.raises(
        RedisServerError, match=r"cannot reach the buffer at 127\.0\.0\.1"
    ) as raised:
        reach(f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required")
    assert "certificate verify failed" in str(raised.value)
    assert PASSWORD not in str(raised.value)
    with pytest.raises(RedisServerError, match="cannot reach the buffer"):
        reach(f"redis://:{PASSWORD}@127.0.0.1:{port}/0")  # plain text to the TLS port
