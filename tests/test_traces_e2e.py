"""
Traces from tracing libraries (Datadog's msgpack agent API) through the
daemon, and trace sampling that agrees across independent daemons.
"""

from __future__ import annotations

import json
import random

import msgpack
import pytest_twisted

from tests.support import Upstream, read_ndjson, run_inspect, send_raw, start_daemon

KNUTH = 1111111111111111111


def span(trace_id: int, span_id: int, parent_id: int, service: str = "checkout") -> dict:
    return {
        "trace_id": trace_id, "span_id": span_id, "parent_id": parent_id, "name": "http.request",
        "resource": "GET /cart", "service": service, "type": "web", "start": 1796400000000000000 + span_id,
        "duration": 1200, "error": 0, "meta": {"env": "test"}, "metrics": {},
    }


def tracer_request(traces: list[list[dict]]) -> tuple[list[tuple[str, str]], bytes]:
    body = msgpack.packb(traces)
    headers = [
        ("Host", "x"), ("Content-Type", "application/msgpack"), ("X-Datadog-Trace-Count", str(len(traces))),
        ("Datadog-Meta-Lang", "python"),
    ]
    return headers, body


@pytest_twisted.ensureDeferred
async def test_tracer_payload_stored(tmp_path):
    """
    A v0.4 msgpack payload gets the Agent's answer and is stored with one
    item per span.
    """
    daemon = start_daemon(tmp_path / "data")
    try:
        traces = [[span(7, 1, 0), span(7, 2, 1)], [span(9, 3, 0)]]
        headers, body = tracer_request(traces)
        status, _, answer = await send_raw(daemon.http_port, "PUT", "/v0.4/traces", headers, body)
        assert status == 200
        assert "rate_by_service" in json.loads(answer)
        records = read_ndjson(await run_inspect(daemon.data_dir, "ls", "--json"))
        assert records[0]["path"] == "/v0.4/traces"
        assert records[0]["items"] == 3
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_two_daemons_keep_whole_traces(tmp_path):
    """
    Spans of one trace sent to two independent daemons in separate
    requests are forwarded together or dropped together, and the decision
    is Datadog's rate-sampler formula.
    """
    rate = 0.5
    upstream = Upstream()
    daemons = [
        start_daemon(tmp_path / name, datadog__agent_endpoint=upstream.url, proxy__mode="sample", proxy__sample_rate=rate)
        for name in ("a", "b")
    ]
    generator = random.Random(20261204)
    trace_ids = [generator.getrandbits(64) for _ in range(300)]
    try:
        for batch_start in range(0, len(trace_ids), 50):
            batch = trace_ids[batch_start : batch_start + 50]
            for half, daemon in enumerate(daemons):
                traces = [
                    [span(trace_id, 2 * index + half + 1, 0 if half == 0 else 2 * index + 1)]
                    for index, trace_id in enumerate(batch)
                ]
                headers, body = tracer_request(traces)
                status, _, _ = await send_raw(daemon.http_port, "PUT", "/v0.4/traces", headers, body)
                assert status == 200

        spans_by_trace: dict[int, int] = {}
        for received in upstream.received:
            for trace in msgpack.unpackb(received.body):
                for forwarded in trace:
                    spans_by_trace[forwarded["trace_id"]] = spans_by_trace.get(forwarded["trace_id"], 0) + 1
        expected_kept = {t for t in trace_ids if (t * KNUTH) % 2**64 < rate * 2**64}
        assert set(spans_by_trace) == expected_kept
        assert all(count == 2 for count in spans_by_trace.values())
        # 300 traces at 0.5: the binomial standard deviation is 8.7, so 5
        # deviations is a false-failure chance below 1e-6.
        assert abs(len(expected_kept) - 150) < 44
        for daemon in daemons:
            stat = json.loads(await run_inspect(daemon.data_dir, "stat", "--json"))
            assert stat["records"] == 6
    finally:
        for daemon in daemons:
            await daemon.stop()
        await upstream.stop()
