"""
The daemon end to end over real sockets: TLS handshakes against the
generated development certificate, a real LMDB environment, a real
upstream server on 127.0.0.1 and the captured Datadog requests replayed
byte for byte.
"""

from __future__ import annotations

import gzip
import hashlib
import json

import pytest
import pytest_twisted

from tests import corpus
from tests.expected_items import decode
from tests.support import (
    Reply,
    TestCertificates,
    Upstream,
    read_ndjson,
    replay_headers,
    reply_from_capture,
    run_inspect,
    send_raw,
    start_daemon,
)

DATADOG_FOLDERS = ("datadog-api-client-python", "datadog-datadogpy")
HOP_BY_HOP = {"connection", "keep-alive", "host", "content-length", "transfer-encoding"}


def datadog_requests():
    return [request for folder in DATADOG_FOLDERS for request in corpus.load(folder)]


@pytest_twisted.ensureDeferred
async def test_corpus_replay_forwarded_over_tls(tmp_path):
    """
    Every captured Datadog request sent over TLS reaches a TLS upstream
    with the same method, target, headers and body; the client gets the
    upstream's answer; the store holds one matching record per request.
    """
    captured = datadog_requests()
    assert len(captured) == 27
    by_target_and_body = {}
    for request in captured:
        by_target_and_body[(request.target, hashlib.sha256(request.body).hexdigest())] = request

    certificates = TestCertificates(tmp_path / "certs")

    def reply_for(received):
        request = by_target_and_body[(received.uri.decode(), hashlib.sha256(received.body).hexdigest())]
        return reply_from_capture(request)

    upstream = Upstream(reply_for, tls=certificates)
    daemon = start_daemon(
        tmp_path / "data",
        proxy__forward_to=upstream.url.replace("127.0.0.1", "localhost"),
        proxy__mode="forward",
        upstream__ca_bundle=str(certificates.ca_path),
    )
    try:
        for request in captured:
            status, headers, body = await send_raw(
                daemon.https_port,
                request.method,
                request.target,
                replay_headers(request, daemon.https_port),
                request.body,
                tls_ca=daemon.dev_certificate,
            )
            expected = request.meta["response"]
            assert status == expected["status"], request
            assert body == expected["body"].encode(), request
            header_map = {name.lower(): value for name, value in headers}
            for name, value in expected["headers"]:
                assert header_map.get(name.lower()) == value, (request, name)

        assert len(upstream.received) == len(captured)
        for request, received in zip(captured, upstream.received):
            assert received.method.decode() == request.method
            assert received.uri.decode() == request.target
            assert received.body == request.body
            for name, value in request.headers:
                if name.lower() in HOP_BY_HOP:
                    continue
                assert received.header_values(name) == [value.encode()], (request, name)
            assert received.header("host") == f"localhost:{upstream.port.getHost().port}".encode()
            assert received.header("via") == b"1.1 reductrai"
            if request.header("accept-encoding") is None:
                assert received.header("accept-encoding") is None, request

        listing = read_ndjson(await run_inspect(daemon.data_dir, "export"))
        assert len(listing) == len(captured)
        for request, record in zip(captured, listing):
            assert record["path"] == request.path
            assert record["method"] == request.method
            assert record["vendor"] == "datadog"
            assert record["wire_bytes"] == len(request.body)
            assert record["raw_bytes"] == request.meta["decoded_length"]
            expected_body = json.loads(decode(request))
            assert record["body"] == expected_body, request
    finally:
        await daemon.stop()
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_store_only_answers_like_datadog(tmp_path):
    """
    With no upstream, each captured request gets the status and body shape
    Datadog gives on success and is stored; nothing is forwarded anywhere.
    """
    daemon = start_daemon(tmp_path / "data")
    assert daemon.service.mode == "store-only"
    assert daemon.service.forwarder is None
    try:
        captured = datadog_requests()
        for request in captured:
            status, headers, body = await send_raw(
                daemon.https_port, request.method, request.target,
                replay_headers(request, daemon.https_port), request.body, tls_ca=daemon.dev_certificate,
            )
            expected = request.meta["response"]
            assert status == expected["status"], request
            answer = json.loads(body)
            expected_body = json.loads(expected["body"])
            assert set(answer) == set(expected_body), request
            if "event" in answer:
                sent = json.loads(decode(request))
                assert answer["event"]["title"] == sent["title"]
                assert answer["event"]["tags"] == sent["tags"]
            elif "data" not in answer:
                assert answer == expected_body, request
        stat = json.loads(await run_inspect(daemon.data_dir, "stat", "--json"))
        assert stat["records"] == len(captured)
        assert stat["raw_bytes"] == sum(r.meta["decoded_length"] for r in captured)
        kinds = {(row["vendor"], row["kind"]): row["records"] for row in stat["by_vendor_kind"]}
        assert kinds[("datadog", "metrics")] == sum(
            1 for r in captured if r.path in ("/api/v1/series", "/api/v2/series", "/api/v1/distribution_points")
        )
        assert kinds[("datadog", "logs")] == sum(1 for r in captured if r.path in ("/api/v2/logs", "/v1/input"))
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_gzip_response_relayed_unchanged(tmp_path):
    """
    treq's decoder must not gunzip the upstream's answer nor replace the
    client's Accept-Encoding: the client gets the gzip bytes and header as
    the upstream sent them.
    """
    payload = gzip.compress(b'{"status":"ok","padding":"' + b"x" * 500 + b'"}')
    upstream = Upstream(
        lambda received: Reply(
            202, [(b"Content-Type", b"application/json"), (b"Content-Encoding", b"gzip")], payload
        )
    )
    daemon = start_daemon(tmp_path / "data", proxy__forward_to=upstream.url, proxy__mode="forward")
    try:
        status, headers, body = await send_raw(
            daemon.http_port, "POST", "/api/v1/series?x=[1]|y",
            [("Host", "x"), ("Accept-Encoding", "br;q=1, gzip;q=0.5"), ("DD-API-KEY", "k" * 32),
             ("Content-Type", "application/json")],
            b'{"series":[]}',
        )
        assert status == 202
        assert dict((k.lower(), v) for k, v in headers)["content-encoding"] == "gzip"
        assert body == payload
        received = upstream.received[0]
        assert received.header_values("accept-encoding") == [b"br;q=1, gzip;q=0.5"]
        assert received.uri == b"/api/v1/series?x=[1]|y"
    finally:
        await daemon.stop()
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_upstream_unreachable_answers_502(tmp_path):
    """
    An upstream that refuses connections gives the client a 502 with a JSON
    reason in relay mode and Datadog's success, marked queued, in the
    default spool mode; the request is stored and spooled either way.
    """
    upstream = Upstream()
    url = upstream.url
    await upstream.stop()
    daemon = start_daemon(
        tmp_path / "data", proxy__forward_to=url, upstream__connect_timeout=2, spool__on_upstream_failure="relay",
    )
    try:
        status, _, body = await send_raw(
            daemon.http_port, "POST", "/api/v2/series", [("Content-Type", "application/json")], b'{"series":[]}'
        )
        assert status == 502
        assert "refused" in json.loads(body)["errors"][0]
        assert daemon.service.store.status()["records"] == 1
        assert daemon.service.spool.status()["depth"] == 1
    finally:
        await daemon.stop()
    queued = start_daemon(tmp_path / "queued", proxy__forward_to=url, upstream__connect_timeout=2)
    try:
        status, headers, body = await send_raw(
            queued.http_port, "POST", "/api/v2/series", [("Content-Type", "application/json")], b'{"series":[]}'
        )
        assert status == 202
        assert json.loads(body) == {"errors": []}
        assert dict((k.lower(), v) for k, v in headers)["x-reductrai-queued"] == "true"
    finally:
        await queued.stop()


@pytest_twisted.ensureDeferred
async def test_upstream_timeout_answers_504(tmp_path):
    """
    An upstream slower than the exchange timeout gives the client a 504.
    """
    upstream = Upstream(lambda received: Reply(delay=3.0))
    daemon = start_daemon(
        tmp_path / "data", proxy__forward_to=upstream.url, upstream__timeout=0.5, spool__on_upstream_failure="relay",
    )
    try:
        status, _, body = await send_raw(
            daemon.http_port, "POST", "/api/v2/series", [("Content-Type", "application/json")], b'{"series":[]}'
        )
        assert status == 504
        assert "timed out after 0.5 s" in json.loads(body)["errors"][0]
    finally:
        await daemon.stop()
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_admin_health_and_ready(tmp_path):
    """
    /health reports version, uptime and store; /ready says ready.
    """
    from tests.support import send_raw as send

    tokens = tmp_path / "admin-tokens"
    tokens.write_text("test-admin-token-0123456789\n")
    daemon = start_daemon(tmp_path / "data", admin__tokens_file=str(tokens))
    try:
        status, _, body = await send(daemon.admin_port, "GET", "/health", [("Host", "x")], b"")
        health = json.loads(body)
        assert status == 200
        assert health["status"] == "ok"
        assert health["version"] == __import__("reductrai").__version__
        assert health["store"]["state"] == "open"
        assert isinstance(health["uptime"], float)
        status, _, body = await send(daemon.admin_port, "GET", "/ready", [("Host", "x")], b"")
        assert status == 200
        assert json.loads(body)["ready"] is True
        status, _, body = await send(daemon.admin_port, "GET", "/metrics", [("Host", "x")], b"")
        assert status == 401
        status, _, body = await send(
            daemon.admin_port, "GET", "/metrics",
            [("Host", "x"), ("Authorization", "Bearer test-admin-token-0123456789")], b"",
        )
        assert status == 200
        assert b"reductrai_requests_total" in body or b"# HELP reductrai_requests" in body
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_unknown_path_stored_and_forwarded(tmp_path):
    """
    A path no vendor claims is never rejected: it is stored as an opaque
    record and forwarded to the one base URL when one is set.
    """
    upstream = Upstream(lambda received: Reply(201, [(b"Content-Type", b"text/plain")], b"made"))
    daemon = start_daemon(tmp_path / "data", proxy__forward_to=upstream.url, proxy__mode="forward")
    try:
        status, _, body = await send_raw(
            daemon.http_port, "PUT", "/custom/ingest?x=1", [("Host", "x"), ("Authorization", "Bearer t0ken")], b"payload"
        )
        assert (status, body) == (201, b"made")
        assert upstream.received[0].uri == b"/custom/ingest?x=1"
        assert upstream.received[0].header("authorization") == b"Bearer t0ken"
        records = read_ndjson(await run_inspect(daemon.data_dir, "export"))
        assert [(r["vendor"], r["kind"], r["path"]) for r in records] == [("unknown", "opaque", "/custom/ingest")]
        assert records[0]["body"] == "payload"
    finally:
        await daemon.stop()
        await upstream.stop()
    store_only = start_daemon(tmp_path / "store-only")
    try:
        status, _, body = await send_raw(store_only.http_port, "POST", "/custom/ingest", [("Host", "x")], b"payload")
        assert status == 200
    finally:
        await store_only.stop()


@pytest_twisted.ensureDeferred
async def test_upstream_cookies_not_shared(tmp_path):
    """
    A cookie an upstream sets is relayed to that client but never sent
    upstream with another client's request.
    """
    upstream = Upstream(
        lambda received: Reply(202, [(b"Content-Type", b"application/json"), (b"Set-Cookie", b"session=abc; Path=/")], b"{}")
    )
    daemon = start_daemon(tmp_path / "data", proxy__forward_to=upstream.url, proxy__mode="forward")
    try:
        for _ in range(2):
            status, headers, _ = await send_raw(
                daemon.http_port, "POST", "/api/v2/series", [("Host", "x"), ("Content-Type", "application/json")],
                b'{"series":[]}',
            )
            assert status == 202
            assert dict((k.lower(), v) for k, v in headers)["set-cookie"] == "session=abc; Path=/"
        assert [r.header("cookie") for r in upstream.received] == [None, None]
    finally:
        await daemon.stop()
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_stop_finishes_requests_in_flight(tmp_path):
    """
    Stopping the service waits for a request whose upstream is still
    answering, and the client gets that answer.
    """
    from twisted.internet import reactor, task

    upstream = Upstream(lambda received: Reply(delay=1.0))
    daemon = start_daemon(tmp_path / "data", proxy__forward_to=upstream.url, proxy__mode="forward")
    try:
        pending = send_raw(
            daemon.http_port, "POST", "/api/v2/series", [("Host", "x"), ("Content-Type", "application/json")],
            b'{"series":[]}',
        )
        await task.deferLater(reactor, 0.3, lambda: None)
        assert daemon.service.ingest_resource.in_flight == 1
        await daemon.stop()
        assert daemon.service.ingest_resource.in_flight == 0
        status, _, _ = await pending
        assert status == 202
        assert len(upstream.received) == 1
    finally:
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_open_circuit_skips_live_forwards(tmp_path):
    """
    Once the spool's circuit for a down upstream is open, requests are
    committed and answered as queued without a live attempt.
    """
    upstream = Upstream()
    url = upstream.url
    await upstream.stop()
    daemon = start_daemon(
        tmp_path / "data", proxy__forward_to=url, proxy__mode="forward",
        spool__circuit_failures=2, spool__backoff_base=0.1, spool__backoff_cap=0.2,
    )
    try:
        for index in range(10):
            status, headers, _ = await send_raw(
                daemon.http_port, "POST", "/api/v2/series", [("Host", "x"), ("Content-Type", "application/json")],
                b'{"series":[],"n":%d}' % index,
            )
            assert status == 202
            assert dict((k.lower(), v) for k, v in headers)["x-reductrai-queued"] == "true"
        live_attempts = daemon.service.forwarder.state_of(url).requests
        assert live_attempts < 10
        assert daemon.service.spool.status()["depth"] == 10
    finally:
        await daemon.stop()
