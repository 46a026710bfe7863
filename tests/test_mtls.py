"""
Mutual TLS on the ingest listener: client certificates required or
optional, verified against server.tls_client_ca, and the verified subject
used to name the client.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Optional

import pytest
import pytest_twisted
from twisted.internet import threads

from reductrai.limits import client_identity
from tests.test_tls import Authority, https_port, tls_daemon


def exchange(port: int, ca_path: Path, client: Optional[tuple[Path, Path]]) -> int:
    """
    POST an empty series list over TLS, with a client certificate when
    given; return the HTTP status.
    """
    context = ssl.create_default_context(cafile=str(ca_path))
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    body = b'{"series":[]}'
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(
                b"POST /api/v2/series HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            response = b""
            while chunk := tls.recv(65536):
                response += chunk
    return int(response.split(b" ", 2)[1])


def refused(port: int, ca_path: Path, client) -> bool:
    try:
        exchange(port, ca_path, client)
    except (ssl.SSLError, ConnectionError, IndexError, ValueError):
        return True
    return False


@pytest_twisted.ensureDeferred
async def test_client_certificate_required(tmp_path):
    """
    With tls_client_auth require, a client with a certificate from the
    client CA is served; one without a certificate or with a certificate
    from another CA is refused in the handshake.
    """
    server_authority = Authority(tmp_path / "server-pki")
    clients = Authority(tmp_path / "client-pki", "client CA")
    strangers = Authority(tmp_path / "other-pki", "stranger CA")
    good = clients.issue("agent", "agent-1", client=True)
    bad = strangers.issue("intruder", "intruder", client=True)
    daemon, _ = tls_daemon(tmp_path, server_authority, server__tls_client_ca=str(clients.ca_path), server__tls_client_auth="require")
    port = https_port(daemon)
    try:
        assert await threads.deferToThread(exchange, port, server_authority.ca_path, good) == 202
        assert await threads.deferToThread(refused, port, server_authority.ca_path, None)
        assert await threads.deferToThread(refused, port, server_authority.ca_path, bad)
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_client_certificate_optional(tmp_path):
    """
    With tls_client_auth optional, clients without a certificate are
    served, a valid one is accepted, one from an unknown CA is refused.
    """
    server_authority = Authority(tmp_path / "server-pki")
    clients = Authority(tmp_path / "client-pki", "client CA")
    strangers = Authority(tmp_path / "other-pki", "stranger CA")
    good = clients.issue("agent", "agent-1", client=True)
    bad = strangers.issue("intruder", "intruder", client=True)
    daemon, _ = tls_daemon(tmp_path, server_authority, server__tls_client_ca=str(clients.ca_path), server__tls_client_auth="optional")
    port = https_port(daemon)
    try:
        assert await threads.deferToThread(exchange, port, server_authority.ca_path, None) == 202
        assert await threads.deferToThread(exchange, port, server_authority.ca_path, good) == 202
        assert await threads.deferToThread(refused, port, server_authority.ca_path, bad)
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_client_subject_names_the_client(tmp_path):
    """
    Per-client rules see the verified certificate's subject: with a rate
    of 1 request per second and a burst of 1, the second request of the
    same certificate gets 429 while another certificate is still served.
    """
    server_authority = Authority(tmp_path / "server-pki")
    clients = Authority(tmp_path / "client-pki", "client CA")
    first = clients.issue("agent-1", "agent-1", client=True)
    second = clients.issue("agent-2", "agent-2", client=True)
    daemon, _ = tls_daemon(
        tmp_path, server_authority,
        server__tls_client_ca=str(clients.ca_path),
        limits__client_requests_per_second=0.01, limits__client_burst=1,
    )
    port = https_port(daemon)
    try:
        assert await threads.deferToThread(exchange, port, server_authority.ca_path, first) == 202
        assert await threads.deferToThread(exchange, port, server_authority.ca_path, first) == 429
        assert await threads.deferToThread(exchange, port, server_authority.ca_path, second) == 202
    finally:
        await daemon.stop()


def test_client_identity_without_certificate():
    """
    Without a TLS client certificate the client is named by its address.
    """
    from twisted.internet.address import IPv4Address
    from twisted.web.test.requesthelper import DummyRequest

    request = DummyRequest([b""])
    request.client = IPv4Address("TCP", "192.0.2.7", 4321)
    assert client_identity(request) == "addr:192.0.2.7"
