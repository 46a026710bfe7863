"""
Every client limit over real sockets: header count and size (431), a
silent client and a trickling client (408), the connection limit (503),
the network allow-list (403) and the per-client rate (429), each counted
in reductrai_limits_hit.
"""

from __future__ import annotations

import socket
import time

import pytest_twisted
from twisted.internet import threads

from reductrai.limits import ClientRateLimiter, NetworkAllowList, parse_networks
from tests.support import start_daemon


def talk(port: int, chunks: list[bytes], pause: float = 0.0, timeout: float = 10.0) -> bytes:
    """
    Send C{chunks} with C{pause} seconds between them, then read until the
    server closes; return what it answered.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        try:
            for chunk in chunks:
                connection.sendall(chunk)
                if pause:
                    time.sleep(pause)
        except OSError:
            pass
        response = b""
        try:
            while data := connection.recv(65536):
                response += data
        except OSError:
            pass
    return response


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def hits(daemon, limit: str) -> float:
    for line in daemon.service.metrics.render().decode().splitlines():
        if line.startswith(f'reductrai_limits_hit_total{{limit="{limit}",role="ingest"}}'):
            return float(line.split()[-1])
    return 0.0


REQUEST_HEAD = b"POST /api/v2/series HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@pytest_twisted.ensureDeferred
async def test_header_limits(tmp_path):
    """
    One header field over limits.max_header_count, or a head one byte over
    limits.max_header_bytes, gets 431; a request just within both is
    served.
    """
    daemon = start_daemon(tmp_path / "data", limits__max_header_count=10, limits__max_header_bytes=2048)
    port = daemon.http_port
    try:
        within = REQUEST_HEAD + b"".join(b"X-%d: v\r\n" % n for n in range(6)) + b"Content-Length: 13\r\nConnection: close\r\n\r\n{\"series\":[]}"
        assert status_of(await threads.deferToThread(talk, port, [within])) == 202
        over = REQUEST_HEAD + b"".join(b"X-%d: v\r\n" % n for n in range(8)) + b"Content-Length: 0\r\n\r\n"
        assert status_of(await threads.deferToThread(talk, port, [over])) == 431
        assert hits(daemon, "header_count") == 1
        start = REQUEST_HEAD + b"Content-Length: 0\r\nX-Pad: "
        # Bytes counted are the lines without their CRLF.
        counted = sum(len(line) for line in (start + b"\r\n").split(b"\r\n"))
        too_big = start + b"a" * (2048 - counted + 1) + b"\r\n\r\n"
        assert status_of(await threads.deferToThread(talk, port, [too_big])) == 431
        one_line = b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\n\r\n"
        assert status_of(await threads.deferToThread(talk, port, [one_line])) == 431
        assert hits(daemon, "header_bytes") == 2
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_silent_client_gets_408(tmp_path):
    """
    A client that stops sending in the middle of a request gets 408 after
    server.request_timeout seconds.
    """
    daemon = start_daemon(tmp_path / "data", server__request_timeout=1)
    try:
        began = time.monotonic()
        response = await threads.deferToThread(talk, daemon.http_port, [REQUEST_HEAD + b"Content-Length: 100\r\n\r\n{"])
        assert status_of(response) == 408
        assert time.monotonic() - began >= 0.9
        assert hits(daemon, "idle_timeout") == 1
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_trickling_client_gets_408(tmp_path):
    """
    A client that keeps sending a byte every 0.25 s, never silent long
    enough for the idle timeout, gets 408 at limits.request_deadline.
    """
    daemon = start_daemon(tmp_path / "data", server__request_timeout=5, limits__request_deadline=1)
    try:
        chunks = [REQUEST_HEAD[i:i + 1] for i in range(12)]
        response = await threads.deferToThread(talk, daemon.http_port, chunks, 0.25)
        assert status_of(response) == 408
        assert hits(daemon, "request_deadline") == 1
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_connection_limit(tmp_path):
    """
    Beyond limits.max_connections open connections a new one gets 503 and
    is closed; once one closes, a new connection is served again.
    """
    daemon = start_daemon(tmp_path / "data", limits__max_connections=2)
    port = daemon.http_port
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        for _ in range(50):
            if daemon.service.ports[0].factory.limits.open_connections == 2:
                break
            await sleep(0.05)
        response = await threads.deferToThread(talk, port, [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"])
        assert status_of(response) == 503
        assert hits(daemon, "connections") == 1
        gauge = [line for line in daemon.service.metrics.render().decode().splitlines()
                 if line.startswith('reductrai_connections_open{role="ingest"}')]
        assert float(gauge[0].split()[-1]) == 2
        held.pop().close()
        for _ in range(50):
            if daemon.service.ports[0].factory.limits.open_connections < 2:
                break
            await sleep(0.05)
        response = await threads.deferToThread(talk, port, [REQUEST_HEAD + b"Content-Length: 13\r\nConnection: close\r\n\r\n{\"series\":[]}"])
        assert status_of(response) == 202
    finally:
        for connection in held:
            connection.close()
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_network_allow_list(tmp_path):
    """
    A client outside limits.allow_networks gets 403; inside, it is served.
    """
    daemon = start_daemon(tmp_path / "data", limits__allow_networks=["10.0.0.0/8"])
    try:
        response = await threads.deferToThread(talk, daemon.http_port, [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"])
        assert status_of(response) == 403
        assert hits(daemon, "network") == 1
    finally:
        await daemon.stop()
    daemon = start_daemon(tmp_path / "data2", limits__allow_networks=["10.0.0.0/8", "127.0.0.0/8"])
    try:
        request = REQUEST_HEAD + b"Content-Length: 13\r\nConnection: close\r\n\r\n{\"series\":[]}"
        assert status_of(await threads.deferToThread(talk, daemon.http_port, [request])) == 202
    finally:
        await daemon.stop()


def test_allow_list_addresses():
    """
    Addresses match their networks, IPv4-mapped IPv6 included; an empty
    list allows everything.
    """
    allow = NetworkAllowList(parse_networks(["192.0.2.0/24", "2001:db8::/32"]))
    assert allow.allows("192.0.2.9")
    assert allow.allows("::ffff:192.0.2.9")
    assert allow.allows("2001:db8::1")
    assert not allow.allows("198.51.100.1")
    assert not allow.allows("not an address")
    assert NetworkAllowList().allows("198.51.100.1")


def test_token_bucket():
    """
    A client gets its burst at once, then one request per 1/rate seconds;
    another client has its own bucket.
    """
    now = [100.0]
    limiter = ClientRateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == 0.5
    assert limiter.acquire("b") == 0.0
    now[0] += 0.5
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") > 0


@pytest_twisted.ensureDeferred
async def test_client_rate_limit(tmp_path):
    """
    Past its burst a client gets 429 with Retry-After.
    """
    daemon = start_daemon(tmp_path / "data", limits__client_requests_per_second=0.5, limits__client_burst=2)
    request = REQUEST_HEAD + b"Content-Length: 13\r\nConnection: close\r\n\r\n{\"series\":[]}"
    try:
        statuses = [status_of(await threads.deferToThread(talk, daemon.http_port, [request])) for _ in range(3)]
        assert statuses == [202, 202, 429]
        response = await threads.deferToThread(talk, daemon.http_port, [request])
        assert b"\r\nRetry-After: 2\r\n" in response or b"\r\nRetry-After: 1\r\n" in response, response
        assert hits(daemon, "client_rate") == 2
    finally:
        await daemon.stop()


def sleep(seconds: float):
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)
