"""
Bad requests get a clear 4xx in Datadog's error style and leave the
records accepted before them intact.
"""

from __future__ import annotations

import gzip
import json
import socket

import pytest_twisted
import zstandard
from twisted.internet import threads

from tests.support import read_ndjson, run_inspect, send_raw, start_daemon

SERIES = b'{"series":[{"metric":"a.b","points":[[1796400000,1]]}]}'


def raw_exchange(port: int, data: bytes) -> bytes:
    """
    Send raw bytes on a fresh connection and read until the server closes
    it or 5 seconds pass.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(data)
        chunks = []
        try:
            while True:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            pass
    return b"".join(chunks)


async def post(daemon, path, body, headers=()):
    return await send_raw(
        daemon.http_port, "POST", path,
        [("Host", "x"), ("Content-Type", "application/json"), *headers], body,
    )


@pytest_twisted.ensureDeferred
async def test_bad_requests_rejected_earlier_records_intact(tmp_path):
    """
    Oversized bodies, bombs, unknown encodings, corrupt bodies, unknown
    paths and wrong methods each get their status; the first stored record
    is unchanged afterwards.
    """
    daemon = start_daemon(tmp_path / "data", limits__max_body_bytes=64 * 1024, limits__max_decoded_bytes=1024 * 1024)
    try:
        status, _, _ = await post(daemon, "/api/v1/series", SERIES)
        assert status == 202

        status, _, body = await post(daemon, "/api/v1/series", b"x" * (65 * 1024))
        assert status == 413
        assert "limit of 65536 bytes" in json.loads(body)["errors"][0]

        bomb = gzip.compress(b"\0" * (50 * 1024 * 1024))
        assert len(bomb) < 64 * 1024
        status, _, body = await post(daemon, "/api/v1/series", bomb, [("Content-Encoding", "gzip")])
        assert status == 413
        assert json.loads(body)["errors"]

        declared = zstandard.ZstdCompressor().compress(b"{" + b" " * (4 * 1024 * 1024) + b"}")
        status, _, _ = await post(daemon, "/api/v2/series", declared, [("Content-Encoding", "zstd1")])
        assert status == 413

        status, _, body = await post(daemon, "/api/v1/series", SERIES, [("Content-Encoding", "compress")])
        assert status == 415
        assert "compress" in json.loads(body)["errors"][0]

        status, _, body = await post(daemon, "/api/v1/series", b"not gzip at all", [("Content-Encoding", "gzip")])
        assert status == 400
        assert "gzip" in json.loads(body)["errors"][0]

        status, _, body = await post(daemon, "/api/v1/series", b'{"series": "not a list"}')
        assert status == 400
        assert json.loads(body)["errors"]

        status, headers, body = await send_raw(daemon.http_port, "GET", "/api/v2/series", [("Host", "x")], b"")
        assert status == 405
        assert dict((k.lower(), v) for k, v in headers)["allow"] == "POST"

        malformed = (
            b"POST /api/v1/series HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\nhello\r\n0\r\n\r\n"
        )
        answer = await threads.deferToThread(raw_exchange, daemon.http_port, malformed)
        assert answer.startswith(b"HTTP/1.1 400")

        records = read_ndjson(await run_inspect(daemon.data_dir, "export"))
        assert len(records) == 1
        assert records[0]["body"] == json.loads(SERIES)
        stat = json.loads(await run_inspect(daemon.data_dir, "stat", "--json"))
        assert stat["records"] == 1
        assert stat.get("corrupt", 0) == 0
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_chunked_body_accepted(tmp_path):
    """
    A well-formed chunked body is reassembled and stored whole.
    """
    daemon = start_daemon(tmp_path / "data")
    try:
        half = len(SERIES) // 2
        request = (
            b"POST /api/v1/series HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            + f"{half:x}\r\n".encode() + SERIES[:half] + b"\r\n"
            + f"{len(SERIES) - half:x}\r\n".encode() + SERIES[half:] + b"\r\n0\r\n\r\n"
        )
        answer = await threads.deferToThread(raw_exchange, daemon.http_port, request)
        assert answer.startswith(b"HTTP/1.1 202")
        records = read_ndjson(await run_inspect(daemon.data_dir, "export"))
        assert records[0]["body"] == json.loads(SERIES)
    finally:
        await daemon.stop()
