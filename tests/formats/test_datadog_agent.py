"""
Tests for L{reductrai.formats.datadog_agent}.

The corpus has no Datadog Agent or tracer traffic, so these tests build
payloads the way the Agent and the tracers do: protobuf with the generated
classes, and msgpack with the C{msgpack} package.
"""

from __future__ import annotations

import json

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reductrai.formats import datadog_agent
from reductrai.formats.items import METRIC, SKETCH, SPAN, PayloadContext, PayloadError
from reductrai.proto import datadog_metrics_pb2, datadog_trace_pb2

MetricPayload = datadog_metrics_pb2.MetricPayload


def _context(path: str, content_type: str = "application/x-protobuf") -> PayloadContext:
    return PayloadContext(path=path, content_type=content_type)


def _metric_payload() -> MetricPayload:
    payload = MetricPayload()
    cpu = payload.series.add(metric="system.cpu.user", type=MetricPayload.GAUGE, interval=10,
                             tags=["env:test", "service:fake-checkout", "role:web", "role:db", "standalone"])
    cpu.resources.add(type="host", name="fake-host-01")
    cpu.resources.add(type="device", name="/dev/sda1")
    cpu.points.add(value=12.5, timestamp=1796413000)
    cpu.points.add(value=13.0, timestamp=1796413010)
    hits = payload.series.add(metric="checkout.hits", type=MetricPayload.COUNT, tags=["env:test"])
    hits.points.add(value=3.0, timestamp=1796413000)
    rate = payload.series.add(metric="checkout.rate", type=MetricPayload.RATE)
    rate.resources.add(type="host", name="fake-host-02")
    rate.points.add(value=0.25, timestamp=1796413000)
    return payload


def test_metric_payload():
    """
    One metric item per point, series by series, with host from the host
    resource, service from the service tag, and the metric type name.
    """
    payload = _metric_payload()
    parsed = datadog_agent.parse(payload.SerializeToString(), _context("/api/v2/series"))
    type_names = {MetricPayload.GAUGE: "gauge", MetricPayload.COUNT: "count", MetricPayload.RATE: "rate"}
    expected = []
    for series in payload.series:
        hosts = [r.name for r in series.resources if r.type == "host"]
        for point in series.points:
            expected.append((series.metric, point.value, point.timestamp * 10**9, type_names[series.type],
                             hosts[0] if hosts else None))
    assert [(i.name, i.value, i.timestamp_ns, i.metric_type, i.host) for i in parsed.items] == expected
    assert [i.index for i in parsed.items] == list(range(len(expected)))
    assert all(i.kind == METRIC for i in parsed.items)
    first = parsed.items[0]
    assert first.service == "fake-checkout"
    assert first.tags == {"env": "test", "service": "fake-checkout", "role": "web,db", "standalone": "",
                          "device": "/dev/sda1"}
    assert parsed.items[2].service is None


def test_metric_payload_rejects_json():
    """
    JSON on /api/v2/series is not the Agent's protobuf payload.
    """
    with pytest.raises(PayloadError):
        datadog_agent.parse(b'{"series": []}', _context("/api/v2/series", "application/json"))


def test_sketch_payload():
    """
    One sketch item per distribution and dogsketch entry, valued by its sum.
    """
    payload = datadog_metrics_pb2.SketchPayload()
    sketch = payload.sketches.add(metric="request.latency", host="fake-host-01", tags=["service:fake-checkout"])
    sketch.dogsketches.add(ts=1796413000, cnt=4, min=0.1, max=0.9, avg=0.5, sum=2.0, k=[1, 5], n=[2, 2])
    sketch.dogsketches.add(ts=1796413010, cnt=1, min=0.3, max=0.3, avg=0.3, sum=0.3, k=[3], n=[1])
    other = payload.sketches.add(metric="queue.depth", host="fake-host-02")
    other.distributions.add(ts=1796413000, cnt=2, sum=8.0)
    payload.metadata.agent_version = "7.60.0"
    parsed = datadog_agent.parse(payload.SerializeToString(), _context("/api/beta/sketches"))
    expected = []
    for s in payload.sketches:
        for entry in list(s.distributions) + list(s.dogsketches):
            expected.append((s.metric, s.host, entry.sum, entry.ts * 10**9))
    assert [(i.name, i.host, i.value, i.timestamp_ns) for i in parsed.items] == expected
    assert {i.kind for i in parsed.items} == {SKETCH}
    assert parsed.items[0].service == "fake-checkout"
    assert parsed.items[0].metric_type == "distribution"


def _agent_payload() -> datadog_trace_pb2.AgentPayload:
    payload = datadog_trace_pb2.AgentPayload(hostName="agent-host", env="prod", agentVersion="7.60.0")
    payload.tags["agent_tag"] = "a"
    tracer = payload.tracerPayloads.add(hostname="fake-host-01", env="test", languageName="python")
    chunk = tracer.chunks.add(priority=2)
    root = chunk.spans.add(service="fake-checkout", name="flask.request", resource="GET /orders", traceID=0x1234,
                           spanID=0xABCDEF, parentID=0, start=1796413000000000000, duration=5_000_000, error=0,
                           type="web")
    root.meta["_dd.p.tid"] = "6a1b2c3d00000000"
    root.meta["http.status_code"] = "200"
    root.metrics["_sampling_priority_v1"] = 2.0
    child = chunk.spans.add(service="fake-checkout", name="postgres.query", resource="SELECT", traceID=0x1234,
                            spanID=0xABCDF0, parentID=0xABCDEF, start=1796413000001000000, duration=1_000_000,
                            error=1)
    child.meta["error.message"] = "timeout"
    tracer.chunks.add(priority=-128).spans.add(service="other", name="op", traceID=7, spanID=8)
    payload.tracerPayloads.add(env="").chunks.add(priority=0).spans.add(name="no-host", traceID=9, spanID=10)
    return payload


def test_agent_payload():
    """
    One span item per span with 128-bit trace ids from _dd.p.tid, parent
    ids, error level, chunk priority, and host from the tracer payload or
    the agent.
    """
    payload = _agent_payload()
    parsed = datadog_agent.parse(payload.SerializeToString(), _context("/api/v0.2/traces"))
    expected = []
    for tracer in payload.tracerPayloads:
        for chunk in tracer.chunks:
            for span in chunk.spans:
                high = span.meta.get("_dd.p.tid", "")
                expected.append((
                    span.name,
                    (high or "0" * 16) + format(span.traceID, "016x"),
                    format(span.spanID, "016x"),
                    format(span.parentID, "016x") if span.parentID else None,
                    "error" if span.error else None,
                    None if chunk.priority == -128 else chunk.priority,
                    tracer.hostname or payload.hostName,
                ))
    got = [(i.name, i.trace_id, i.span_id, i.parent_id, i.level, i.sampling_priority, i.host) for i in parsed.items]
    assert got == expected
    assert [i.index for i in parsed.items] == [0, 1, 2, 3]
    root = parsed.items[0]
    assert root.kind == SPAN
    assert root.service == "fake-checkout"
    assert root.timestamp_ns == 1796413000000000000
    assert root.tags["env"] == "test"
    assert root.tags["agent_tag"] == "a"
    assert root.tags["resource"] == "GET /orders"
    assert root.tags["type"] == "web"
    assert root.tags["http.status_code"] == "200"
    assert parsed.items[3].tags["env"] == "prod"


def _tracer_span(**overrides):
    span = {"service": "fake-checkout", "name": "flask.request", "resource": "GET /orders", "trace_id": 2**63 + 5,
            "span_id": 11, "parent_id": 0, "start": 1796413000000000000, "duration": 5000, "error": 0,
            "meta": {"env": "test"}, "metrics": {"_sampling_priority_v1": 1}, "type": "web"}
    span.update(overrides)
    return span


def test_tracer_v04_msgpack():
    """
    A v0.4 msgpack body gives one span item per span, trace by trace, with
    the sampling priority from the span metrics.
    """
    traces = [
        [_tracer_span(), _tracer_span(span_id=12, parent_id=11, name="db", error=1, metrics={})],
        [_tracer_span(trace_id=99, span_id=13, meta={"_dd.p.tid": "00000000000000ff", "_dd.hostname": "h1"})],
    ]
    parsed = datadog_agent.parse(msgpack.packb(traces), _context("/v0.4/traces", "application/msgpack"))
    expected = []
    for trace in traces:
        for span in trace:
            high = span["meta"].get("_dd.p.tid", "0" * 16)
            expected.append((span["name"], high + format(span["trace_id"], "016x"), format(span["span_id"], "016x"),
                             format(span["parent_id"], "016x") if span["parent_id"] else None,
                             "error" if span["error"] else None,
                             int(span["metrics"]["_sampling_priority_v1"]) if span["metrics"] else None))
    got = [(i.name, i.trace_id, i.span_id, i.parent_id, i.level, i.sampling_priority) for i in parsed.items]
    assert got == expected
    assert parsed.items[2].host == "h1"
    assert parsed.items[0].tags["env"] == "test"


def test_tracer_v04_json():
    """
    The same traces as JSON (content type application/json) parse the same.
    """
    traces = [[_tracer_span(), _tracer_span(span_id=12, parent_id=11)]]
    from_json = datadog_agent.parse(json.dumps(traces).encode(), _context("/v0.4/traces", "application/json"))
    from_msgpack = datadog_agent.parse(msgpack.packb(traces), _context("/v0.4/traces", "application/msgpack"))
    assert from_json == from_msgpack
    assert len(from_json.items) == 2


def test_tracer_v05():
    """
    A v0.5 body resolves every string through the string table.
    """
    table = ["", "fake-checkout", "flask.request", "GET /orders", "env", "test", "web", "_sampling_priority_v1"]
    index = table.index
    span = [index("fake-checkout"), index("flask.request"), index("GET /orders"), 42, 43, 0,
            1796413000000000000, 5000, 1, {index("env"): index("test")}, {index("_sampling_priority_v1"): 2.0},
            index("web")]
    parsed = datadog_agent.parse(msgpack.packb([table, [[span]]]), _context("/v0.5/traces", "application/msgpack"))
    (item,) = parsed.items
    assert (item.service, item.name, item.level, item.sampling_priority) == ("fake-checkout", "flask.request", "error", 2)
    assert item.trace_id == format(42, "032x")
    assert item.span_id == format(43, "016x")
    assert item.parent_id is None
    assert item.tags["env"] == "test"
    assert item.tags["resource"] == "GET /orders"
    assert item.tags["type"] == "web"


@pytest.mark.parametrize(
    "document",
    [
        {"not": "a list"},
        [{"not": "a trace"}],
        [[["not", "a", "span"]]],
        [[{"trace_id": "abc"}]],
        [[{"meta": ["x"]}]],
        [[{"metrics": {"x": "not-a-number"}}]],
    ],
)
def test_tracer_v04_invalid(document):
    """
    Wrong shapes and field types in a v0.4 payload are PayloadErrors.
    """
    with pytest.raises(PayloadError):
        datadog_agent.parse(msgpack.packb(document), _context("/v0.4/traces", "application/msgpack"))


@pytest.mark.parametrize(
    "document",
    [
        [["x"]],
        [[""], [[[0] * 11]]],
        [[""], [[[5, 0, 0, 1, 2, 0, 0, 0, 0, {}, {}, 0]]]],
    ],
)
def test_tracer_v05_invalid(document):
    """
    Wrong shapes and out-of-range string indices in v0.5 are PayloadErrors.
    """
    with pytest.raises(PayloadError):
        datadog_agent.parse(msgpack.packb(document), _context("/v0.5/traces", "application/msgpack"))


def test_unknown_path():
    """
    A path the module does not handle is a PayloadError.
    """
    with pytest.raises(PayloadError):
        datadog_agent.parse(b"", _context("/api/v1/series"))


def test_parse_tags():
    """
    Tags split at the first colon; repeated keys join their values.
    """
    assert datadog_agent.parse_tags(["a:b:c", "bare", "k:1", "k:2", "k:1"]) == {"a": "b:c", "bare": "", "k": "1,2,1"}


PATHS = st.sampled_from(["/api/v2/series", "/api/beta/sketches", "/api/v0.2/traces", "/v0.4/traces", "/v0.5/traces"])


@settings(deadline=500, max_examples=400)
@given(body=st.binary(max_size=512), path=PATHS)
def test_arbitrary_bytes(body, path):
    """
    Arbitrary bytes give a ParsedPayload or a PayloadError, nothing else.
    """
    try:
        datadog_agent.parse(body, _context(path, "application/msgpack" if path.startswith("/v0.") else None))
    except PayloadError as error:
        assert error.reason


MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats()
    | st.text(max_size=10) | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=12) | st.dictionaries(
        st.sampled_from(["service", "name", "trace_id", "span_id", "parent_id", "meta", "metrics", "error", "start"])
        | st.integers(0, 5),
        children, max_size=5),
    max_leaves=40,
)


@settings(deadline=500, max_examples=400)
@given(document=MSGPACK_VALUES, path=st.sampled_from(["/v0.4/traces", "/v0.5/traces"]))
def test_arbitrary_msgpack(document, path):
    """
    Arbitrary msgpack structures give a ParsedPayload or a PayloadError.
    """
    try:
        datadog_agent.parse(msgpack.packb(document), _context(path, "application/msgpack"))
    except PayloadError as error:
        assert error.reason


@settings(deadline=500, max_examples=200)
@given(document=MSGPACK_VALUES)
def test_arbitrary_json(document):
    """
    Arbitrary JSON on /v0.4/traces gives a ParsedPayload or a PayloadError.
    """
    try:
        body = json.dumps(document, default=lambda value: value.hex()).encode()
    except ValueError:
        return
    try:
        datadog_agent.parse(body, _context("/v0.4/traces", "application/json"))
    except PayloadError as error:
        assert error.reason
