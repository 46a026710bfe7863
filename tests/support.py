"""
Real parts for tests: a recording upstream server, the daemon started in
process on ephemeral loopback ports, and clients that send exact bytes.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import os
import ssl
from io import BytesIO
from pathlib import Path
from typing import Callable, Optional

import attrs
from twisted.internet import defer, reactor, threads
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from reductrai.config import load_settings
from reductrai.service import ReductraiService


@attrs.define
class Received:
    """
    One request as the upstream saw it.
    """

    method: bytes
    uri: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> Optional[bytes]:
        values = [v for k, v in self.headers if k.lower() == name.lower().encode()]
        return values[-1] if values else None

    def header_values(self, name: str) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name.lower().encode()]


@attrs.define
class Reply:
    """
    What the recording upstream answers.
    """

    status: int = 202
    headers: list[tuple[bytes, bytes]] = attrs.field(factory=lambda: [(b"Content-Type", b"application/json")])
    body: bytes = b"{}"
    delay: float = 0.0


class RecordingResource(Resource):
    """
    Record every request and answer with C{reply_for(received)}.
    """

    isLeaf = True

    def __init__(self, reply_for: Callable[[Received], Reply]) -> None:
        super().__init__()
        self.received: list[Received] = []
        self.reply_for = reply_for

    def render(self, request):
        received = Received(
            method=request.method,
            uri=request.uri,
            headers=[(name, value) for name, values in request.requestHeaders.getAllRawHeaders() for value in values],
            body=request.content.read(),
        )
        self.received.append(received)
        reply = self.reply_for(received)

        def write():
            request.setResponseCode(reply.status)
            for name, value in reply.headers:
                request.responseHeaders.addRawHeader(name, value)
            if reply.status != 204:
                request.setHeader(b"content-length", str(len(reply.body)).encode())
                request.write(reply.body)
            request.finish()

        if reply.delay:
            call = reactor.callLater(reply.delay, write)
            request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
        else:
            write()
        return NOT_DONE_YET


class TestCertificates:
    __test__ = False

    """
    A throwaway CA and a server certificate for C{localhost} and
    C{127.0.0.1}, written as PEM files into a directory.
    """

    def __init__(self, directory: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "reductrai test CA")])
        ca = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        certificate = (
            x509.CertificateBuilder().subject_name(name).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_path = directory / "ca.pem"
        self.certificate_path = directory / "server.pem"
        self.key_path = directory / "server-key.pem"
        self.ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self.certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        self.key_path.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )

    def server_options(self) -> CertificateOptions:
        pem = self.certificate_path.read_bytes() + self.key_path.read_bytes()
        return PrivateCertificate.loadPEM(pem).options()


class Upstream:
    """
    A recording HTTP(S) server on 127.0.0.1 with an ephemeral port.
    """

    def __init__(self, reply_for: Callable[[Received], Reply] = lambda r: Reply(), tls: Optional[TestCertificates] = None) -> None:
        self.resource = RecordingResource(reply_for)
        site = _TrackingSite(self.resource)
        site.noisy = False
        self._site = site
        if tls is None:
            self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
            scheme = "http"
        else:
            self.port = reactor.listenSSL(0, site, tls.server_options(), interface="127.0.0.1")
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.port.getHost().port}"

    @property
    def received(self) -> list[Received]:
        return self.resource.received

    def stop(self):
        """
        Stop listening and drop every open connection, as a crashed server
        would.
        """
        for protocol in list(self._site.connections):
            transport = getattr(protocol, "transport", None) or getattr(protocol._channel, "transport", None)
            if transport is not None:
                transport.abortConnection()
        return defer.maybeDeferred(self.port.stopListening)


class _TrackingSite(Site):
    """
    A site that remembers its open connections.
    """

    def __init__(self, resource) -> None:
        super().__init__(resource)
        self.connections: set = set()

    def buildProtocol(self, address):
        protocol = super().buildProtocol(address)
        connections = self.connections
        lost = protocol.connectionLost

        def connection_lost(reason):
            connections.discard(protocol)
            return lost(reason)

        protocol.connectionLost = connection_lost
        connections.add(protocol)
        return protocol


@attrs.define
class Daemon:
    """
    A daemon started in process, with its bound ports.
    """

    service: ReductraiService
    data_dir: Path

    @property
    def http_port(self) -> int:
        return self._port_of("tcp")

    @property
    def https_port(self) -> int:
        return self._port_of("ssl")

    @property
    def admin_port(self) -> int:
        return self.service.admin_ports[0].getHost().port

    @property
    def dev_certificate(self) -> str:
        return str(self.data_dir / "tls" / "dev-cert.pem")

    def _port_of(self, kind: str) -> int:
        for description, port in zip(self.service.settings["server.listen"], self.service.ports):
            if description.startswith(kind + ":"):
                return port.getHost().port
        raise LookupError(kind)

    def stop(self):
        return self.service.stopService()


def start_daemon(data_dir: Path, environ: Optional[dict] = None, **overrides) -> Daemon:
    """
    Start the daemon in process on ephemeral loopback ports (one plain
    HTTP, one HTTPS, one admin listener).  Settings are given by key with
    dots replaced by double underscores: C{proxy__forward_to=...}.
    """
    values = {
        "server.data_dir": str(data_dir),
        "server.listen": ["tcp:0:interface=127.0.0.1", "ssl:0:interface=127.0.0.1"],
        "server.admin_listen": ["tcp:0:interface=127.0.0.1"],
    }
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    settings = load_settings(None, environ=environ or {}, overrides=values)
    service = ReductraiService(settings, reactor)
    service.privilegedStartService()
    service.startService()
    return Daemon(service, data_dir)


def send_raw(
    port: int,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
    tls_ca: Optional[str] = None,
    timeout: float = 10.0,
) -> "defer.Deferred[tuple[int, list[tuple[str, str]], bytes]]":
    """
    Send one request with exactly these headers in this order (no
    C{Host} or C{Accept-Encoding} added; C{Content-Length} only when a
    body is given without framing headers) from a thread, over TLS when
    C{tls_ca} names the CA file to trust.

    @return: a L{Deferred} firing with C{(status, headers, body)}.
    """

    def send():
        if tls_ca:
            context = ssl.create_default_context(cafile=tls_ca)
            connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=timeout)
        else:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            framing = {name.lower() for name, _ in headers} & {"content-length", "transfer-encoding"}
            if body and not framing:
                connection.putheader("Content-Length", str(len(body)))
            for name, value in headers:
                connection.putheader(name, value)
            connection.endheaders(body)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    return threads.deferToThread(send)


def replay_headers(captured, port: int) -> list[tuple[str, str]]:
    """
    Return a captured request's headers in wire order with C{Host}
    pointed at C{port}.
    """
    return [
        (name, f"127.0.0.1:{port}" if name.lower() == "host" else value)
        for name, value in captured.headers
    ]


def reply_from_capture(captured) -> Reply:
    """
    The response the capture server gave to a captured request.
    """
    response = captured.meta["response"]
    return Reply(
        status=response["status"],
        headers=[(n.encode(), v.encode()) for n, v in response["headers"]],
        body=response["body"].encode("utf-8"),
    )


def run_inspect(data_dir: Path, *arguments: str) -> "defer.Deferred[str]":
    """
    Run C{reductrai-inspect} as a separate process and return its output.
    """
    import subprocess
    import sys

    def run():
        result = subprocess.run(
            [sys.executable, "-m", "reductrai.inspect", "--data-dir", str(data_dir), *arguments],
            capture_output=True, timeout=60, check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"reductrai-inspect failed ({result.returncode}): {result.stderr.decode()}")
        return result.stdout.decode("utf-8")

    return threads.deferToThread(run)


def read_ndjson(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class FakeIngestRequest(DummyRequest):
    """
    A L{DummyRequest} with the attributes L{reductrai.resource.IngestResource}
    reads from an L{reductrai.request.IngestRequest}: a POST of C{body}.
    """

    too_large = False
    _disconnected = False

    def __init__(self, path: bytes, body: bytes, headers: dict[bytes, bytes]) -> None:
        super().__init__(path.lstrip(b"/").split(b"/"))
        self.path = path
        self.uri = path
        self.method = b"POST"
        self.content = BytesIO(body)
        self.channel = DummyChannel()
        self.requestHeaders = Headers({name: [value] for name, value in headers.items()})
