"""
Tests for payload thinning and re-encoding: every corpus request at rates
0, 0.1 and 1, and built payloads of the formats the corpus lacks (Datadog
agent and tracer traces, OTLP/JSON, Loki protobuf, Zipkin, HEC raw).
Thinned payloads are checked with the parser and, independently, with
the vendor's schema (protobuf classes, JSON, lines).
"""

from __future__ import annotations

import gzip
import json
import random
import zlib

import attrs
import msgpack
import pytest
import zstandard
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from reductrai.encoding import decode_body
from reductrai.formats import datadog, datadog_agent, loki, otlp, splunk, zipkin
from reductrai.formats.items import ParsedPayload, PayloadContext
from reductrai.proto import datadog_trace_pb2, loki_push_pb2
from reductrai.sampling import ALL, SamplingPolicy, reencode, thin_payload
from reductrai.sampling.thin_otlp import encode_threshold, threshold_for, with_sampling_rate
from tests.corpus import load_all
from tests.sampling.support import make_context, prepare

CORPUS = list(load_all())


def _without_index(item):
    return attrs.evolve(item, index=0)


def _independent_count(prepared, body: bytes) -> int:
    """
    Count the records of a body without the reductrai parsers.
    """
    path = prepared.context.path
    if path.endswith("/v1/traces"):
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        return sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
    if path.endswith("/v1/logs"):
        request = logs_service_pb2.ExportLogsServiceRequest.FromString(body)
        return sum(len(s.log_records) for r in request.resource_logs for s in r.scope_logs)
    if path.endswith("/_bulk"):
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        return sum(1 for line in lines if set(line) & {"index", "create", "update", "delete"})
    if path.startswith("/services/collector"):
        return body.decode().count('"event"')
    document = json.loads(body)
    if path in ("/api/v2/logs", "/v1/input"):
        return len(document) if isinstance(document, list) else 1
    if path in ("/loki/api/v1/push", "/api/prom/push"):
        return sum(len(s.get("values", s.get("entries", []))) for s in document["streams"])
    if path == "/log/v1":
        return sum(len(block["logs"]) for block in document)
    if path == "/trace/v1":
        return sum(len(block["spans"]) for block in document)
    raise AssertionError(f"no independent count for {path}")


@pytest.mark.parametrize("rate", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("request_", CORPUS, ids=lambda r: f"{r.folder}/{r.name}")
def test_corpus_thinning(request_, rate: float) -> None:
    """
    Every captured request, thinned at the rate, parses again and holds
    exactly the items the decision kept; re-encoded with the request's
    content-encoding, it decodes back to the thinned body.
    """
    prepared = prepare(request_)
    policy = SamplingPolicy.from_settings({"proxy.sample_rate": rate})
    decision = policy.decide(prepared.vendor, prepared.route_kind, prepared.parsed)
    if prepared.route_kind not in ("logs", "traces"):
        assert decision.keep_indexes is ALL
    body = thin_payload(
        prepared.vendor, prepared.route_name, prepared.context, prepared.decoded, prepared.parsed,
        decision.keep_indexes, decision.rates,
    )
    if decision.keep_indexes is ALL:
        assert body is prepared.decoded
        return
    expected = [item for item in prepared.parsed.items if item.index in decision.keep_indexes]
    assert decision.forwarded_items == len(expected)
    assert decision.forwarded_items + decision.dropped_items == len(prepared.parsed.items)
    if not expected:
        assert body is None
        return
    reparsed = prepared.parser(body, prepared.context)
    assert [_without_index(item) for item in reparsed.items] == [_without_index(item) for item in expected]
    assert _independent_count(prepared, body) == len(expected)
    encoding = request_.meta.get("content_encoding")
    assert decode_body(reencode(body, encoding), encoding, 1 << 26) == body


def test_corpus_rate_zero_keeps_only_levels() -> None:
    """
    At rate 0 only always-kept levels of the corpus logs survive, and no
    corpus span does (none carries a user-keep priority).
    """
    policy = SamplingPolicy.from_settings({"proxy.sample_rate": 0.0})
    for request_ in CORPUS:
        prepared = prepare(request_)
        decision = policy.decide(prepared.vendor, prepared.route_kind, prepared.parsed)
        if decision.keep_indexes is ALL:
            continue
        for item in prepared.parsed.items:
            kept = item.index in decision.keep_indexes
            if item.kind == "log":
                assert kept == (item.level in policy.keep_levels)
            elif item.kind == "span":
                assert not kept


def _agent_payload(trace_ids: list[int]) -> bytes:
    payload = datadog_trace_pb2.AgentPayload(hostName="fake-host-01", env="test", agentVersion="7.0.0")
    tracer = payload.tracerPayloads.add(languageName="python", hostname="fake-host-01")
    for trace_id in trace_ids:
        chunk = tracer.chunks.add(priority=1)
        root = chunk.spans.add(service="fake-checkout", name="web", traceID=trace_id, spanID=trace_id ^ 1, parentID=0)
        root.metrics["_sampling_priority_v1"] = 1.0
        chunk.spans.add(service="fake-db", name="query", traceID=trace_id, spanID=trace_id ^ 2, parentID=trace_id ^ 1)
    second = payload.tracerPayloads.add(languageName="go")
    chunk = second.chunks.add(priority=2)
    chunk.spans.add(service="fake-keep", name="kept", traceID=3, spanID=4)
    return payload.SerializeToString()


def test_datadog_agent_payload() -> None:
    generator = random.Random(11)
    trace_ids = [generator.getrandbits(64) | 1 for _ in range(40)]
    body = _agent_payload(trace_ids)
    context = make_context("/api/v0.2/traces", "application/x-protobuf")
    parsed = datadog_agent.parse(body, context)
    decision = SamplingPolicy.from_settings({"proxy.sample_rate": 0.25}).decide("datadog", "traces", parsed)
    thinned = thin_payload("datadog", "traces", context, body, parsed, decision.keep_indexes, decision.rates)
    payload = datadog_trace_pb2.AgentPayload.FromString(thinned)
    kept_ids = [span.traceID for tracer in payload.tracerPayloads for chunk in tracer.chunks for span in chunk.spans]
    product = lambda t: (t * 1111111111111111111) % 2**64  # noqa: E731
    expected = [t for t in trace_ids if product(t) < int(0.25 * float(2**64 - 1)) for _ in range(2)] + [3]
    assert kept_ids == expected
    assert all(len(chunk.spans) == 2 for chunk in payload.tracerPayloads[0].chunks)
    for chunk in payload.tracerPayloads[0].chunks:
        assert chunk.spans[0].metrics["_sample_rate"] == 0.25
        assert "_sample_rate" not in chunk.spans[1].metrics
    assert "_sample_rate" not in payload.tracerPayloads[1].chunks[0].spans[0].metrics
    assert payload.hostName == "fake-host-01" and payload.agentVersion == "7.0.0"
    reparsed = datadog_agent.parse(thinned, context)
    assert len(reparsed.items) == len(decision.keep_indexes)


def test_datadog_tracer_v04_msgpack_and_v05() -> None:
    generator = random.Random(12)
    trace_ids = [generator.getrandbits(64) | 1 for _ in range(30)]
    traces = [
        [
            {"trace_id": t, "span_id": t ^ 1, "parent_id": 0, "service": "svc", "name": "root", "resource": "/",
             "start": 1, "duration": 2, "error": 0, "meta": {}, "metrics": {"_sample_rate": 0.5}},
            {"trace_id": t, "span_id": t ^ 2, "parent_id": t ^ 1, "service": "svc", "name": "child", "resource": "/",
             "start": 1, "duration": 1, "error": 0, "meta": {}, "metrics": {}},
        ]
        for t in trace_ids
    ]
    body = msgpack.packb(traces)
    context = make_context("/v0.4/traces", "application/msgpack")
    parsed = datadog_agent.parse(body, context)
    decision = SamplingPolicy.from_settings({"proxy.sample_rate": 0.3}).decide("datadog", "traces", parsed)
    thinned = msgpack.unpackb(
        thin_payload("datadog", "traces_v04", context, body, parsed, decision.keep_indexes, decision.rates),
        strict_map_key=False,
    )
    expected = [t for t in trace_ids if ((t * 1111111111111111111) % 2**64) < int(0.3 * float(2**64 - 1))]
    assert [trace[0]["trace_id"] for trace in thinned] == expected
    assert all(trace[0]["metrics"]["_sample_rate"] == 0.5 * 0.3 for trace in thinned)

    table = ["", "svc", "root", "/"]
    spans = [[[1, 2, 3, t, t ^ 1, 0, 1, 2, 0, {}, {}, 0]] for t in trace_ids]
    body05 = msgpack.packb([table, spans])
    context05 = make_context("/v0.5/traces", "application/msgpack")
    parsed05 = datadog_agent.parse(body05, context05)
    decision05 = SamplingPolicy.from_settings({"proxy.sample_rate": 0.3}).decide("datadog", "traces", parsed05)
    thinned05 = thin_payload("datadog", "traces_v05", context05, body05, parsed05, decision05.keep_indexes, decision05.rates)
    new_table, new_traces = msgpack.unpackb(thinned05, strict_map_key=False)
    assert [trace[0][3] for trace in new_traces] == expected
    key = new_table.index("_sample_rate")
    assert all(trace[0][10][key] == 0.3 for trace in new_traces)
    assert len(datadog_agent.parse(thinned05, context05).items) == len(expected)


def test_otlp_json_traces_keep_structure() -> None:
    generator = random.Random(13)
    trace_ids = [generator.getrandbits(128) | 1 for _ in range(24)]

    def span_json(t: int, n: int) -> dict:
        return {"traceId": format(t, "032x"), "spanId": format(n + 1, "016x"), "name": f"s{n}",
                "traceState": "vendor=x", "startTimeUnixNano": "1"}

    document = {
        "resourceSpans": [
            {"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": f"svc{r}"}}]},
             "scopeSpans": [{"scope": {"name": f"scope{r}{s}"},
                             "spans": [span_json(trace_ids[r * 8 + s * 4 + n], n) for n in range(4)]}
                            for s in range(2)]}
            for r in range(3)
        ]
    }
    body = json.dumps(document).encode()
    context = make_context("/v1/traces", "application/json")
    parsed = otlp.parse(body, context)
    decision = SamplingPolicy.from_settings({"proxy.sample_rate": 0.4}).decide("otlp", "traces", parsed)
    thinned = thin_payload("otlp", "traces", context, body, parsed, decision.keep_indexes, decision.rates)
    result = json.loads(thinned)
    kept_ids = [span["traceId"] for r in result["resourceSpans"] for s in r["scopeSpans"] for span in s["spans"]]
    expected = [format(t, "032x") for t in trace_ids
                if ((t % 2**64) * 1111111111111111111) % 2**64 < int(0.4 * float(2**64 - 1))]
    assert kept_ids == expected
    for resource in result["resourceSpans"]:
        assert resource["scopeSpans"], "empty scopes are removed"
        for scope in resource["scopeSpans"]:
            assert scope["spans"]
            for span in scope["spans"]:
                assert span["traceState"] == f"ot=th:{encode_threshold(threshold_for(0.4))},vendor=x"
    assert len(otlp.parse(thinned, context).items) == len(expected)


def test_otlp_threshold_encoding() -> None:
    assert with_sampling_rate("", 1.0) == "ot=th:0"
    assert with_sampling_rate("", 0.5) == "ot=th:8"
    assert with_sampling_rate("", 0.25) == "ot=th:c"
    assert with_sampling_rate("ot=th:8;rv:abcdefabcdefab,a=b", 0.5) == "ot=th:c;rv:abcdefabcdefab,a=b"


def test_otlp_protobuf_logs_drop_empty_resources() -> None:
    request = logs_service_pb2.ExportLogsServiceRequest()
    for resource_number in range(3):
        resource = request.resource_logs.add()
        resource.resource.attributes.add(key="service.name").value.string_value = f"svc{resource_number}"
        scope = resource.scope_logs.add()
        record = scope.log_records.add(severity_text="INFO", time_unix_nano=resource_number + 1)
        record.body.string_value = f"line {resource_number}"
    body = request.SerializeToString()
    context = make_context("/v1/logs", "application/x-protobuf")
    parsed = otlp.parse(body, context)
    thinned = thin_payload("otlp", "logs", context, body, parsed, frozenset({1}))
    result = logs_service_pb2.ExportLogsServiceRequest.FromString(thinned)
    assert len(result.resource_logs) == 1
    assert result.resource_logs[0].scope_logs[0].log_records[0].body.string_value == "line 1"


def test_loki_protobuf() -> None:
    request = loki_push_pb2.PushRequest()
    for stream_number in range(2):
        stream = request.streams.add(labels=f'{{app="a{stream_number}"}}')
        for n in range(3):
            entry = stream.entries.add(line=f"{stream_number}-{n}")
            entry.timestamp.seconds = 1796400000 + n
    body = request.SerializeToString()
    context = make_context("/loki/api/v1/push", "application/x-protobuf")
    parsed = loki.parse(body, context)
    thinned = thin_payload("loki", "push", context, body, parsed, frozenset({0, 2}))
    result = loki_push_pb2.PushRequest.FromString(thinned)
    assert [(s.labels, [e.line for e in s.entries]) for s in result.streams] == [('{app="a0"}', ["0-0", "0-2"])]
    assert [i.message for i in loki.parse(thinned, context).items] == ["0-0", "0-2"]


def test_zipkin_and_splunk_raw_verbatim() -> None:
    spans = [{"traceId": format(n + 1, "032x"), "id": format(n + 1, "016x"), "name": f"s{n}"} for n in range(4)]
    body = json.dumps(spans, indent=1).encode()
    context = make_context("/api/v2/spans", "application/json")
    parsed = zipkin.parse(body, context)
    thinned = thin_payload("zipkin", "spans", context, body, parsed, frozenset({1, 3}))
    assert json.loads(thinned) == [spans[1], spans[3]]
    assert json.dumps(spans[1], indent=1).replace("\n", "\n ").encode() in thinned

    raw = b"first line\n\nsecond line\r\nthird line\n"
    raw_context = PayloadContext(path="/services/collector/raw")
    raw_parsed = splunk.parse(raw, raw_context)
    assert thin_payload("splunk", "raw", raw_context, raw, raw_parsed, frozenset({0, 2})) == b"first line\nthird line\n"


def test_datadog_text_logs_and_nothing_kept() -> None:
    body = b"one\ntwo\nthree\n"
    context = PayloadContext(path="/v1/input", content_type="text/plain")
    parsed = datadog.parse(body, context)
    assert thin_payload("datadog", "logs_v1", context, body, parsed, frozenset({1})) == b"two\n"
    assert thin_payload("datadog", "logs_v1", context, body, parsed, frozenset()) is None


@pytest.mark.parametrize("encoding", [None, "gzip", "deflate", "zstd1", "snappy", "x-snappy-framed", "lz4", "br", "gzip, zstd"])
def test_reencode_round_trip(encoding) -> None:
    data = b"payload " * 500
    encoded = reencode(data, encoding)
    assert decode_body(encoded, encoding, 1 << 20) == data
    if encoding == "deflate":
        assert zlib.decompress(encoded) == data
    if encoding == "gzip":
        assert gzip.decompress(encoded) == data
    if encoding == "zstd1":
        assert zstandard.ZstdDecompressor().decompress(encoded) == data


def test_metrics_never_thinned_in_corpus() -> None:
    """
    At rate 0 every metric request of the corpus is forwarded unchanged.
    """
    policy = SamplingPolicy.from_settings({"proxy.sample_rate": 0.0})
    seen = 0
    for request_ in CORPUS:
        prepared = prepare(request_)
        if prepared.route_kind != "metrics":
            continue
        seen += 1
        decision = policy.decide(prepared.vendor, prepared.route_kind, prepared.parsed)
        assert decision.keep_indexes is ALL
        assert thin_payload(prepared.vendor, prepared.route_name, prepared.context, prepared.decoded,
                            prepared.parsed, decision.keep_indexes) is prepared.decoded
    assert seen > 0
