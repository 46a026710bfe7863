"""
Tests for L{reductrai.formats.otlp}.

The captured OTLP/HTTP protobuf requests are checked against a walk over the
opentelemetry-proto classes written here.  OTLP/JSON has no corpus, so the
JSON tests use hand-written documents in the form of the OTLP/JSON examples
(hex ids, integer enums, int64 as strings, camelCase keys).
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib

import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from reductrai.formats import otlp
from reductrai.formats.items import LOG, METRIC, SPAN, PayloadContext, PayloadError
from tests import corpus

CORPUS = corpus.load("opentelemetry-python-otlp-http")

REQUEST_CLASSES = {
    "/v1/traces": trace_service_pb2.ExportTraceServiceRequest,
    "/v1/metrics": metrics_service_pb2.ExportMetricsServiceRequest,
    "/v1/logs": logs_service_pb2.ExportLogsServiceRequest,
}


def _decoded_body(request_) -> bytes:
    encoding = request_.meta["content_encoding"]
    if encoding == "gzip":
        return gzip.decompress(request_.body)
    if encoding == "deflate":
        return zlib.decompress(request_.body)
    assert encoding is None
    return request_.body


def _resource(resource) -> dict:
    return {kv.key: kv.value for kv in resource.attributes}


def _expected_units(path: str, message) -> list[dict]:
    """
    Walk a decoded export request and describe each span, log record or data
    point with the fields the parser must extract.
    """
    units = []
    if path == "/v1/traces":
        for rs in message.resource_spans:
            resource = _resource(rs.resource)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    units.append({
                        "kind": SPAN, "name": span.name, "service": resource["service.name"].string_value,
                        "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                        "parent_id": span.parent_span_id.hex() or None,
                        "level": "error" if span.status.code == 2 else None,
                        "timestamp_ns": span.start_time_unix_nano,
                        "attribute_keys": {kv.key for kv in span.attributes},
                    })
    elif path == "/v1/logs":
        for rl in message.resource_logs:
            resource = _resource(rl.resource)
            for sl in rl.scope_logs:
                for record in sl.log_records:
                    units.append({
                        "kind": LOG, "message": record.body.string_value,
                        "service": resource["service.name"].string_value,
                        "trace_id": record.trace_id.hex() or None, "span_id": record.span_id.hex() or None,
                        "severity_number": record.severity_number, "timestamp_ns": record.time_unix_nano,
                        "attribute_keys": {kv.key for kv in record.attributes},
                    })
    else:
        for rm in message.resource_metrics:
            resource = _resource(rm.resource)
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    data = metric.WhichOneof("data")
                    for point in getattr(metric, data).data_points:
                        if data in ("gauge", "sum"):
                            value = point.as_double if point.HasField("as_double") else float(point.as_int)
                        else:
                            value = point.sum
                        units.append({
                            "kind": METRIC, "name": metric.name, "data": data, "value": value,
                            "service": resource["service.name"].string_value,
                            "timestamp_ns": point.time_unix_nano,
                            "attribute_keys": {kv.key for kv in point.attributes},
                        })
    return units


def test_corpus_has_all_requests():
    """
    The corpus folder contains the 19 captured OTLP/HTTP requests.
    """
    assert len(CORPUS) == 19


@pytest.mark.parametrize("request_", CORPUS, ids=lambda r: r.name)
def test_corpus_requests(request_):
    """
    Each captured request gives one item per span, log record or data point,
    with the fields read from the opentelemetry-proto message.
    """
    body = _decoded_body(request_)
    message = REQUEST_CLASSES[request_.path]()
    message.ParseFromString(body)
    expected = _expected_units(request_.path, message)
    parsed = otlp.parse(body, PayloadContext(path=request_.path, content_type=request_.meta["content_type"]))
    assert parsed.rejected == 0
    assert parsed.errors == []
    assert len(parsed.items) == len(expected) > 0
    for index, (item, unit) in enumerate(zip(parsed.items, expected)):
        assert item.index == index
        assert item.kind == unit["kind"]
        assert item.service == unit["service"] == "fake-checkout"
        assert item.timestamp_ns == unit["timestamp_ns"]
        assert unit["attribute_keys"] <= set(item.tags)
        if unit["kind"] == SPAN:
            assert (item.name, item.trace_id, item.span_id, item.parent_id, item.level) == (
                unit["name"], unit["trace_id"], unit["span_id"], unit["parent_id"], unit["level"])
        elif unit["kind"] == LOG:
            assert (item.message, item.trace_id, item.span_id) == (unit["message"], unit["trace_id"], unit["span_id"])
            # SeverityNumber 9-12 is INFO, 13-16 WARN, 17-20 ERROR.
            number = unit["severity_number"]
            assert item.level == {2: "info", 3: "warn", 4: "error"}[(number - 1) // 4]
        else:
            assert item.name == unit["name"]
            assert item.value == unit["value"]


def test_corpus_has_error_span_and_error_log():
    """
    The corpus traces end with an error span and the logs hold a
    C{logger.exception} record; both come out with level C{error}.
    """
    levels = {}
    for request_ in CORPUS:
        parsed = otlp.parse(_decoded_body(request_), PayloadContext(path=request_.path))
        for item in parsed.items:
            levels.setdefault(item.kind, set()).add(item.level)
    assert "error" in levels[SPAN]
    assert "error" in levels[LOG]


def test_corpus_metric_types():
    """
    The corpus metrics (counter, up-down counter, histogram, exponential
    histogram, observable gauge) map to the documented metric types.
    """
    body = _decoded_body(next(r for r in CORPUS if r.path == "/v1/metrics"))
    message = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
    expected = []
    for rm in message.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                data = metric.WhichOneof("data")
                if data == "sum":
                    kind = "count" if metric.sum.is_monotonic else "gauge"
                else:
                    kind = data
                expected.extend([kind] * len(getattr(metric, data).data_points))
    parsed = otlp.parse(body, PayloadContext(path="/v1/metrics"))
    assert [item.metric_type for item in parsed.items] == expected
    assert {"count", "gauge", "histogram", "exponential_histogram"} <= set(expected)


TRACE_ID = "5b8efff798038103d269b633813fc60c"
SPAN_ID = "eee19b7ec3c1b174"
PARENT_ID = "eee19b7ec3c1b173"

JSON_TRACES = {
    "resourceSpans": [{
        "resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": "fake-checkout"}},
            {"key": "host.name", "value": {"stringValue": "fake-host-01"}},
        ]},
        "scopeSpans": [{
            "scope": {"name": "my.library", "version": "1.0.0"},
            "spans": [
                {
                    "traceId": TRACE_ID, "spanId": SPAN_ID, "parentSpanId": PARENT_ID,
                    "name": "GET /orders", "kind": 2,
                    "startTimeUnixNano": "1796413000000000000", "endTimeUnixNano": "1796413001000000000",
                    "attributes": [
                        {"key": "http.status_code", "value": {"intValue": "500"}},
                        {"key": "retry", "value": {"boolValue": True}},
                        {"key": "ratio", "value": {"doubleValue": 0.5}},
                        {"key": "list", "value": {"arrayValue": {"values": [{"stringValue": "a"}, {"intValue": "2"}]}}},
                    ],
                    "status": {"code": 2, "message": "boom"},
                    "links": [{"traceId": TRACE_ID, "spanId": PARENT_ID}],
                },
                {
                    "traceId": TRACE_ID, "spanId": "00f067aa0ba902b7", "name": "SELECT",
                    "startTimeUnixNano": "1796413000500000000", "status": {},
                },
            ],
        }],
    }]
}


def test_json_traces():
    """
    OTLP/JSON spans come out with their hex ids, int64 strings read as
    numbers, the error status and flattened attributes.
    """
    body = json.dumps(JSON_TRACES).encode()
    parsed = otlp.parse(body, PayloadContext(path="/v1/traces", content_type="application/json"))
    assert len(parsed.items) == 2
    first, second = parsed.items
    assert (first.trace_id, first.span_id, first.parent_id) == (TRACE_ID, SPAN_ID, PARENT_ID)
    assert (first.name, first.level, first.service, first.host) == ("GET /orders", "error", "fake-checkout", "fake-host-01")
    assert first.timestamp_ns == 1796413000000000000
    assert first.tags["http.status_code"] == "500"
    assert first.tags["retry"] == "true"
    assert first.tags["ratio"] == "0.5"
    assert json.loads(first.tags["list"]) == ["a", 2]
    assert (second.index, second.parent_id, second.level, second.span_id) == (1, None, None, "00f067aa0ba902b7")


def test_json_matches_protobuf():
    """
    The same request in OTLP/JSON and in protobuf gives the same items.
    """
    body = json.dumps(JSON_TRACES).encode()
    from_json = otlp.parse(body, PayloadContext(path="/v1/traces", content_type="application/json"))
    # Build the protobuf form independently: base64 ids, as the generic
    # protobuf JSON mapping wants.
    document = json.loads(body)
    for resource_spans in document["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
                for link in span.get("links", []):
                    for key in ("traceId", "spanId"):
                        link[key] = base64.b64encode(bytes.fromhex(link[key])).decode()
    message = json_format.ParseDict(document, trace_service_pb2.ExportTraceServiceRequest())
    from_protobuf = otlp.parse(
        message.SerializeToString(), PayloadContext(path="/v1/traces", content_type="application/x-protobuf")
    )
    assert from_json == from_protobuf
    assert message.resource_spans[0].scope_spans[0].spans[0].trace_id.hex() == TRACE_ID


def test_json_logs_and_metrics():
    """
    OTLP/JSON logs and metrics: severity, body, ids; gauge, sum, histogram
    and summary points with their values.
    """
    logs = {"resourceLogs": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "svc"}}]},
             "scopeLogs": [{"logRecords": [
                 {"timeUnixNano": "1796413000000000001", "severityNumber": 13, "severityText": "WARNING",
                  "body": {"stringValue": "disk almost full"}, "traceId": TRACE_ID, "spanId": SPAN_ID},
                 {"observedTimeUnixNano": "1796413000000000002", "severityText": "Error",
                  "body": {"kvlistValue": {"values": [{"key": "a", "value": {"intValue": "1"}}]}}},
             ]}]}]}
    parsed = otlp.parse(json.dumps(logs).encode(), PayloadContext(path="/v1/logs", content_type="application/json; charset=utf-8"))
    first, second = parsed.items
    assert (first.level, first.message, first.trace_id, first.span_id) == ("warn", "disk almost full", TRACE_ID, SPAN_ID)
    assert first.timestamp_ns == 1796413000000000001
    assert (second.level, json.loads(second.message), second.trace_id) == ("error", {"a": 1}, None)
    assert second.timestamp_ns == 1796413000000000002

    metrics = {"resourceMetrics": [{"resource": {}, "scopeMetrics": [{"metrics": [
        {"name": "temp", "gauge": {"dataPoints": [{"asDouble": 21.5, "timeUnixNano": "1"}, {"asInt": "7", "timeUnixNano": "2"}]}},
        {"name": "requests", "sum": {"isMonotonic": True, "aggregationTemporality": 2,
                                     "dataPoints": [{"asInt": "42", "timeUnixNano": "3"}]}},
        {"name": "latency", "histogram": {"aggregationTemporality": 1, "dataPoints": [
            {"count": "3", "sum": 1.25, "bucketCounts": ["1", "2"], "explicitBounds": [0.5], "timeUnixNano": "4",
             "exemplars": [{"traceId": TRACE_ID, "spanId": SPAN_ID, "asDouble": 0.4}]}]}},
        {"name": "quantiles", "summary": {"dataPoints": [{"count": "2", "sum": 3.0, "timeUnixNano": "5"}]}},
    ]}]}]}
    parsed = otlp.parse(json.dumps(metrics).encode(), PayloadContext(path="/v1/metrics", content_type="application/json"))
    assert [(i.index, i.name, i.value, i.metric_type, i.timestamp_ns) for i in parsed.items] == [
        (0, "temp", 21.5, "gauge", 1),
        (1, "temp", 7.0, "gauge", 2),
        (2, "requests", 42.0, "count", 3),
        (3, "latency", 1.25, "histogram", 4),
        (4, "quantiles", 3.0, "summary", 5),
    ]


def test_json_bad_hex_id():
    """
    A trace id that is not hex makes an OTLP/JSON request invalid.
    """
    document = json.loads(json.dumps(JSON_TRACES))
    document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"] = "not-hex"
    with pytest.raises(PayloadError):
        otlp.parse(json.dumps(document).encode(), PayloadContext(path="/v1/traces", content_type="application/json"))


def test_invalid_ids_are_rejected_items():
    """
    Spans with ids of the wrong length are rejected one by one, keep their
    place in the numbering, and are counted for partial success.
    """
    request = trace_service_pb2.ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add().spans
    spans.add(trace_id=bytes(range(1, 17)), span_id=bytes(range(1, 9)), name="good-1")
    spans.add(trace_id=b"\x01" * 8, span_id=bytes(range(1, 9)), name="short-trace-id")
    spans.add(trace_id=bytes(range(1, 17)), span_id=bytes(range(2, 10)), name="good-2")
    parsed = otlp.parse(request.SerializeToString(), PayloadContext(path="/v1/traces"))
    assert [(item.index, item.name) for item in parsed.items] == [(0, "good-1"), (2, "good-2")]
    assert parsed.rejected == 1
    assert len(parsed.errors) == 1
    assert "span 1" in parsed.errors[0]


@pytest.mark.parametrize(
    "signal, response_class, field",
    [
        ("traces", trace_service_pb2.ExportTraceServiceResponse, "rejected_spans"),
        ("metrics", metrics_service_pb2.ExportMetricsServiceResponse, "rejected_data_points"),
        ("logs", logs_service_pb2.ExportLogsServiceResponse, "rejected_log_records"),
    ],
)
def test_encode_response(signal, response_class, field):
    """
    Responses carry partial_success only when something was rejected, in
    the request's encoding.
    """
    empty = otlp.encode_response("application/x-protobuf", 0, "", signal)
    assert not response_class.FromString(empty).HasField("partial_success")
    assert json.loads(otlp.encode_response("application/json", 0, "", signal)) == {}

    partial = response_class.FromString(otlp.encode_response(None, 2, "2 spans had bad ids", signal))
    assert getattr(partial.partial_success, field) == 2
    assert partial.partial_success.error_message == "2 spans had bad ids"

    document = json.loads(otlp.encode_response("application/json", 2, "bad", signal))
    camel = "".join(part.capitalize() if i else part for i, part in enumerate(field.split("_")))
    assert document == {"partialSuccess": {camel: "2", "errorMessage": "bad"}}
    assert otlp.response_content_type("application/json; charset=utf-8") == "application/json"
    assert otlp.response_content_type(None) == "application/x-protobuf"


def test_unknown_path_and_content_type():
    """
    An unknown signal path or content type is a PayloadError.
    """
    with pytest.raises(PayloadError):
        otlp.parse(b"", PayloadContext(path="/v1/profiles"))
    with pytest.raises(PayloadError):
        otlp.parse(b"", PayloadContext(path="/v1/traces", content_type="text/plain"))


PATHS = st.sampled_from(["/v1/traces", "/v1/metrics", "/v1/logs"])


@settings(deadline=500, max_examples=300)
@given(body=st.binary(max_size=512), path=PATHS,
       content_type=st.sampled_from([None, "application/x-protobuf", "application/json"]))
def test_arbitrary_bytes(body, path, content_type):
    """
    Arbitrary bytes give a ParsedPayload or a PayloadError, nothing else.
    """
    try:
        parsed = otlp.parse(body, PayloadContext(path=path, content_type=content_type))
    except PayloadError as error:
        assert error.reason
    else:
        assert parsed.rejected == len(parsed.errors)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["resourceSpans", "resourceLogs", "resourceMetrics", "scopeSpans", "spans", "traceId",
                         "spanId", "logRecords", "metrics", "gauge", "dataPoints", "asInt", "body", "attributes",
                         "key", "value", "stringValue", "name", "x"]),
        children, max_size=4),
    max_leaves=30,
)


@settings(deadline=500, max_examples=300)
@given(document=JSON_VALUES, path=PATHS)
def test_arbitrary_json(document, path):
    """
    Arbitrary JSON in OTLP-like shapes gives a ParsedPayload or a
    PayloadError, nothing else.
    """
    body = json.dumps(document).encode()
    try:
        otlp.parse(body, PayloadContext(path=path, content_type="application/json"))
    except PayloadError as error:
        assert error.reason
