"""
Sample mode end to end: everything is stored, metrics reach the upstream
untouched, logs and traces arrive thinned but valid, and every client gets
the answer it would have got from the vendor.
"""

from __future__ import annotations

import hashlib
import json

import pytest_twisted

from tests import corpus
from tests.expected_items import decode, expected_items
from tests.support import Reply, Upstream, read_ndjson, replay_headers, reply_from_capture, run_inspect, send_raw, start_daemon

METRIC_PATHS = {
    "/api/v1/series", "/api/v2/series", "/api/v1/distribution_points", "/api/v1/check_run",
    "/api/v1/events", "/api/v2/events", "/v1/metrics", "/api/v1/write", "/metric/v1", "/v1/accounts/events",
}


def otlp_log_severities(body: bytes) -> list[int]:
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2

    request = logs_service_pb2.ExportLogsServiceRequest.FromString(body)
    return [
        record.severity_number
        for resource in request.resource_logs for scope in resource.scope_logs for record in scope.log_records
    ]


@pytest_twisted.ensureDeferred
async def test_corpus_in_sample_mode(tmp_path):
    """
    At a 10% rate, metric-like requests are forwarded byte for byte, the
    thinned requests still decode with the vendor's schema, warnings and
    errors are never dropped, and each client gets its vendor's status.
    """
    captured = list(corpus.load_all())
    originals = {}
    for request in captured:
        originals[(request.target, hashlib.sha256(request.body).hexdigest())] = request

    def reply_for(received):
        original = originals.get((received.uri.decode(), hashlib.sha256(received.body).hexdigest()))
        if original is not None:
            return reply_from_capture(original)
        for request in captured:
            if request.target == received.uri.decode():
                return reply_from_capture(request)
        return Reply()

    upstream = Upstream(reply_for)
    daemon = start_daemon(tmp_path / "data", proxy__forward_to=upstream.url, proxy__sample_rate=0.1)
    assert daemon.service.mode == "sample"
    try:
        for request in captured:
            status, _, _ = await send_raw(
                daemon.http_port, request.method, request.target, replay_headers(request, daemon.http_port), request.body,
            )
            assert status == request.meta["response"]["status"], request

        received_by_path: dict[str, list] = {}
        for received in upstream.received:
            received_by_path.setdefault(received.uri.decode().split("?")[0], []).append(received)

        for request in captured:
            if request.path in METRIC_PATHS:
                bodies = [r.body for r in received_by_path.get(request.path, [])]
                assert request.body in bodies, f"metric request not forwarded whole: {request}"

        total_items = sum(expected_items(r) for r in captured)
        forwarded_logs = received_by_path.get("/v1/logs", [])
        for received in forwarded_logs:
            encoding = received.header("content-encoding")
            body = received.body
            if encoding == b"gzip":
                import gzip

                body = gzip.decompress(body)
            severities = otlp_log_severities(body)
            assert severities, "an empty OTLP log request was forwarded"
        warn_records = 0
        for request in captured:
            if request.path == "/v1/logs":
                warn_records += sum(1 for s in otlp_log_severities(decode(request)) if s >= 13)
        forwarded_warn = 0
        for received in forwarded_logs:
            body = received.body
            if received.header("content-encoding") == b"gzip":
                import gzip

                body = gzip.decompress(body)
            forwarded_warn += sum(1 for s in otlp_log_severities(body) if s >= 13)
        assert forwarded_warn == warn_records

        stat = json.loads(await run_inspect(daemon.data_dir, "stat", "--json"))
        assert stat["records"] == len(captured)
        assert len(upstream.received) < len(captured) or total_items == 0
    finally:
        await daemon.stop()
        await upstream.stop()
