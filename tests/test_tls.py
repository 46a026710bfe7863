"""
TLS of the ingest listeners over real sockets: protocol versions and
ciphers probed with C{openssl s_client}, certificates chosen by SNI, and
certificate reloads under load without a failed request.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.support import start_daemon

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


class Authority:
    """
    A throwaway CA that issues server and client certificates as PEM files.
    """

    def __init__(self, directory: Path, name: str = "reductrai test CA") -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.certificate = (
            x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_path = directory / (name.replace(" ", "-") + ".pem")
        self.ca_path.write_bytes(self._pem(self.certificate))

    @staticmethod
    def _pem(certificate) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, stem: str, common_name: str, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), client: bool = False) -> tuple[Path, Path]:
        """
        Issue a certificate and write C{stem}.pem (leaf then CA) and
        C{stem}-key.pem; return both paths.
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
        )
        names = [x509.DNSName(name) for name in dns] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        certificate_path = self.directory / f"{stem}.pem"
        key_path = self.directory / f"{stem}-key.pem"
        certificate_path.write_bytes(self._pem(certificate) + self._pem(self.certificate))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return certificate_path, key_path


def s_client(port: int, *arguments: str) -> tuple[int, str]:
    """
    Run C{openssl s_client} against 127.0.0.1:C{port}, sending nothing;
    return its exit status and its whole output.
    """
    result = subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-brief", *arguments],
        input=b"", capture_output=True, timeout=20, check=False,
    )
    return result.returncode, (result.stdout + result.stderr).decode("utf-8", "replace")


def tls_daemon(tmp_path: Path, authority: Authority | None = None, **overrides):
    authority = authority or Authority(tmp_path / "pki")
    certificate, key = authority.issue("server", "localhost", dns=("localhost",), ips=("127.0.0.1",))
    daemon = start_daemon(
        tmp_path / "data",
        server__listen=["ssl:0:interface=127.0.0.1"],
        server__tls_certificate=str(certificate),
        server__tls_private_key=str(key),
        **overrides,
    )
    return daemon, authority


def https_port(daemon) -> int:
    return daemon.service.ports[0].getHost().port


@needs_openssl
@pytest_twisted.ensureDeferred
async def test_protocol_versions_and_ciphers(tmp_path):
    """
    TLS 1.0 and 1.1 are refused even from a client willing to use them;
    TLS 1.2 and 1.3 are accepted; TLS 1.2 suites without forward secrecy or
    without AEAD are refused; handshake failures are counted.
    """
    daemon, authority = tls_daemon(tmp_path)
    port = https_port(daemon)
    try:
        legacy = ("-cipher", "DEFAULT@SECLEVEL=0")
        for version in ("-tls1", "-tls1_1"):
            status, output = await threads.deferToThread(s_client, port, version, *legacy)
            assert status != 0, output
            assert "Protocol version" not in output or "TLSv1.1" not in output.split("Protocol version")[-1][:20]
            assert "Cipher is" not in output and "Ciphersuite" not in output, output
        for flag, name in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
            status, output = await threads.deferToThread(s_client, port, flag, "-CAfile", str(authority.ca_path))
            assert status == 0, output
            assert f"Protocol version: {name}" in output, output
            assert "Verification: OK" in output, output
        for weak in ("AES128-SHA", "AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"):
            status, output = await threads.deferToThread(s_client, port, "-tls1_2", "-cipher", weak + "@SECLEVEL=0")
            assert status != 0, (weak, output)
        metrics = daemon.service.metrics.render().decode()
        failures = [line for line in metrics.splitlines() if line.startswith('reductrai_tls_handshake_failures_total{role="ingest"}')]
        assert failures and float(failures[0].split()[-1]) >= 6
    finally:
        await daemon.stop()


@needs_openssl
@pytest_twisted.ensureDeferred
async def test_tls_1_3_only(tmp_path):
    """
    With server.tls_minimum_version 1.3, TLS 1.2 is refused and 1.3 works.
    """
    daemon, authority = tls_daemon(tmp_path, server__tls_minimum_version="1.3")
    port = https_port(daemon)
    try:
        status, output = await threads.deferToThread(s_client, port, "-tls1_2")
        assert status != 0, output
        status, output = await threads.deferToThread(s_client, port, "-tls1_3", "-CAfile", str(authority.ca_path))
        assert status == 0 and "Protocol version: TLSv1.3" in output, output
    finally:
        await daemon.stop()


def peer_common_name(port: int, server_name: str, ca_path: Path) -> str:
    context = ssl.create_default_context(cafile=str(ca_path))
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            subject = dict(pair[0] for pair in tls.getpeercert()["subject"])
            return subject["commonName"]


@pytest_twisted.ensureDeferred
async def test_sni_selects_certificate(tmp_path):
    """
    A client naming a host of an SNI certificate gets that certificate
    (wildcards included); any other name gets the default one.
    """
    authority = Authority(tmp_path / "pki")
    extra, extra_key = authority.issue("extra", "extra certificate", dns=("intake.example.test", "*.wild.example.test"))
    daemon, _ = tls_daemon(tmp_path, authority, server__tls_sni_certificates=[f"{extra}:{extra_key}"])
    bundle = authority.ca_path
    port = https_port(daemon)
    try:
        for name, expected in (
            ("intake.example.test", "extra certificate"),
            ("a.wild.example.test", "extra certificate"),
            ("localhost", "localhost"),
            ("other.example.test", "localhost"),
        ):
            assert await threads.deferToThread(peer_common_name, port, name, bundle) == expected
    finally:
        await daemon.stop()


def post_series(port: int, ca_path: Path, server_name: str = "localhost") -> int:
    context = ssl.create_default_context(cafile=str(ca_path))
    body = b'{"series":[]}'
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(
                b"POST /api/v2/series HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            response = b""
            while chunk := tls.recv(65536):
                response += chunk
    return int(response.split(b" ", 2)[1])


@pytest_twisted.ensureDeferred
async def test_reload_under_load_fails_no_request(tmp_path):
    """
    200 requests over about 3 seconds, each on a new TLS connection, while
    the certificate is replaced twice (once through a file change, once
    through SIGHUP's reload): every request succeeds, and handshakes after
    each reload present the new certificate.
    """
    daemon, authority = tls_daemon(tmp_path, server__tls_reload_interval=0.2)
    certificate = Path(daemon.service.settings["server.tls_certificate"])
    key = Path(daemon.service.settings["server.tls_private_key"])
    port = https_port(daemon)
    statuses: list[int] = []
    errors: list[str] = []

    def load() -> None:
        deadline = time.monotonic() + 3.0
        for index in range(200):
            try:
                statuses.append(post_series(port, authority.ca_path))
            except Exception as error:
                errors.append(repr(error))
            pause = (deadline - time.monotonic()) / max(1, 200 - index)
            if pause > 0:
                time.sleep(pause)

    def replace(common_name: str) -> None:
        new_certificate, new_key = authority.issue("next-" + common_name, common_name, dns=("localhost",), ips=("127.0.0.1",))
        os.replace(new_key, key)
        os.replace(new_certificate, certificate)

    try:
        worker = threading.Thread(target=load)
        started = threads.deferToThread(worker.run)
        await sleep(0.8)
        await threads.deferToThread(replace, "first reload")
        await sleep(0.8)
        assert await threads.deferToThread(peer_common_name, port, "localhost", authority.ca_path) == "first reload"
        await threads.deferToThread(replace, "second reload")
        assert daemon.service.reloader.reload() == 0
        assert await threads.deferToThread(peer_common_name, port, "localhost", authority.ca_path) == "second reload"
        await started
        assert errors == []
        assert statuses == [202] * 200
        assert 'reductrai_tls_reloads_total{outcome="ok"}' in daemon.service.metrics.render().decode()
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_invalid_reload_keeps_certificate(tmp_path):
    """
    A certificate file replaced by garbage is not used: the listener keeps
    serving the previous certificate and the failed reload is counted.
    """
    daemon, authority = tls_daemon(tmp_path)
    try:
        Path(daemon.service.settings["server.tls_certificate"]).write_text("not a certificate\n")
        assert daemon.service.tls.reload() == 0
        port = https_port(daemon)
        assert await threads.deferToThread(peer_common_name, port, "localhost", authority.ca_path) == "localhost"
        assert await threads.deferToThread(post_series, port, authority.ca_path) == 202
        assert 'reductrai_tls_reloads_total{outcome="error"} 1.0' in daemon.service.metrics.render().decode()
    finally:
        await daemon.stop()


def sleep(seconds: float):
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)
