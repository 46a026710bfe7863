"""
Every captured request of every vendor through the daemon over TLS: the
upstream gets identical bytes, the client gets the upstream's answer (or,
store-only, the vendor's own success), and the stored record holds the
items the vendor's schema says.
"""

from __future__ import annotations

import hashlib
import json

import pytest_twisted

from tests import corpus
from tests.expected_items import decode, expected_items
from tests.support import TestCertificates, Upstream, read_ndjson, replay_headers, reply_from_capture, run_inspect, send_raw, start_daemon

HOP_BY_HOP = {"connection", "keep-alive", "host", "content-length", "transfer-encoding"}
EXPECTED_VENDOR = {
    "datadog-api-client-python": "datadog",
    "datadog-datadogpy": "datadog",
    "elasticsearch-py": "elasticsearch",
    "newrelic-telemetry-sdk-python": "newrelic",
    "opentelemetry-python-otlp-http": "otlp",
    "prometheus-remote-write": "prometheus",
    "python-logging-loki": "loki",
    "splunk-handler": "splunk",
}


@pytest_twisted.ensureDeferred
async def test_every_corpus_request_forwarded(tmp_path):
    """
    All captured requests, forwarded: bytes and headers reach the upstream
    unchanged, the upstream's answer reaches the client, and each stored
    record decodes to the request's body with the schema's item count.
    """
    captured = list(corpus.load_all())
    assert {request.folder for request in captured} == set(EXPECTED_VENDOR)
    by_body = {(r.target, hashlib.sha256(r.body).hexdigest()): r for r in captured}
    certificates = TestCertificates(tmp_path / "certs")
    upstream = Upstream(
        lambda received: reply_from_capture(by_body[(received.uri.decode(), hashlib.sha256(received.body).hexdigest())]),
        tls=certificates,
    )
    daemon = start_daemon(
        tmp_path / "data", proxy__forward_to=upstream.url, proxy__mode="forward",
        upstream__ca_bundle=str(certificates.ca_path),
    )
    try:
        for request in captured:
            status, headers, body = await send_raw(
                daemon.https_port, request.method, request.target,
                replay_headers(request, daemon.https_port), request.body, tls_ca=daemon.dev_certificate,
            )
            expected = request.meta["response"]
            assert status == expected["status"], request
            assert body == expected["body"].encode(), request
        assert len(upstream.received) == len(captured)
        for request, received in zip(captured, upstream.received):
            assert received.uri.decode() == request.target, request
            assert received.body == request.body, request
            for name, value in request.headers:
                if name.lower() not in HOP_BY_HOP:
                    assert received.header_values(name) == [value.encode()], (request, name)
        records = read_ndjson(await run_inspect(daemon.data_dir, "export"))
        assert len(records) == len(captured)
        for request, record in zip(captured, records):
            assert record["vendor"] == EXPECTED_VENDOR[request.folder], request
            assert record["raw_bytes"] == len(decode(request)), request
            assert record.get("items") == expected_items(request), request
    finally:
        await daemon.stop()
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_every_corpus_request_store_only(tmp_path):
    """
    Without an upstream each vendor's clients get the vendor's success
    status and answer shape.
    """
    daemon = start_daemon(tmp_path / "data")
    try:
        for request in corpus.load_all():
            status, headers, body = await send_raw(
                daemon.https_port, request.method, request.target,
                replay_headers(request, daemon.https_port), request.body, tls_ca=daemon.dev_certificate,
            )
            expected = request.meta["response"]
            assert status == expected["status"], request
            header_map = {name.lower(): value for name, value in headers}
            for name, value in expected["headers"]:
                if name.lower() == "content-type":
                    assert header_map.get("content-type", "").split(";")[0] == value.split(";")[0], request
                else:
                    assert header_map.get(name.lower()) == value, (request, name)
            if expected["body"] and "json" in header_map.get("content-type", ""):
                answer, reference = json.loads(body), json.loads(expected["body"])
                assert set(answer) == set(reference), request
                if request.folder == "elasticsearch-py":
                    assert len(answer["items"]) == len(reference["items"])
                    assert answer["errors"] is False
                    for mine, theirs in zip(answer["items"], reference["items"]):
                        assert set(mine) == set(theirs)
                        action = next(iter(theirs))
                        assert mine[action]["status"] == theirs[action]["status"]
            else:
                assert body == expected["body"].encode(), request
        stat = json.loads(await run_inspect(daemon.data_dir, "stat", "--json"))
        assert stat["records"] == sum(1 for _ in corpus.load_all())
    finally:
        await daemon.stop()
