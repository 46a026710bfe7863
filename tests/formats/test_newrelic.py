"""
Tests for L{reductrai.formats.newrelic}: every captured New Relic
Telemetry SDK request, hand-made edge cases, and property tests.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from reductrai.formats import newrelic
from reductrai.formats.items import ITEM_KINDS, ParsedPayload, PayloadContext, PayloadError
from tests import corpus

REQUESTS = corpus.load("newrelic-telemetry-sdk-python")


def decoded_body(request: corpus.CapturedRequest) -> bytes:
    """
    The SDK always gzips.
    """
    assert request.header("Content-Encoding") == "gzip"
    return gzip.decompress(request.body)


def flat(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def test_corpus_present() -> None:
    assert [r.path for r in REQUESTS] == [
        "/metric/v1",
        "/metric/v1",
        "/v1/accounts/events",
        "/log/v1",
        "/trace/v1",
    ]


@pytest.mark.parametrize("request_", REQUESTS, ids=repr)
def test_corpus_request(request_: corpus.CapturedRequest) -> None:
    """
    Each captured request parses; items match a walk of the JSON done here,
    with C{common.attributes} merged under each record's attributes.
    """
    body = decoded_body(request_)
    document = json.loads(body)
    parsed = newrelic.parse(body, PayloadContext(path=request_.path, headers={}))
    assert parsed.rejected == 0
    assert [item.index for item in parsed.items] == list(range(len(parsed.items)))
    if request_.path == "/v1/accounts/events":
        assert len(parsed.items) == len(document)
        for item, event in zip(parsed.items, document):
            assert item.kind == "event"
            assert item.name == event["eventType"]
            assert item.timestamp_ns == event["timestamp"] * 10**6
            for key, value in event.items():
                if key not in ("eventType", "timestamp"):
                    assert item.tags[key] == flat(value)
        return
    records_key = {"/metric/v1": "metrics", "/log/v1": "logs", "/trace/v1": "spans"}[request_.path]
    expected = []
    for block in document:
        common = block.get("common", {}).get("attributes", {})
        for record in block[records_key]:
            expected.append((record, {**common, **record.get("attributes", {})}))
    assert len(parsed.items) == len(expected) > 0
    for item, (record, attributes) in zip(parsed.items, expected):
        assert item.timestamp_ns == record["timestamp"] * 10**6
        assert item.service == attributes.get("service.name")
        assert item.host == attributes.get("host.name", attributes.get("host"))
        for key, value in attributes.items():
            assert item.tags[key] == flat(value)
        if records_key == "metrics":
            value = record["value"]
            assert item.kind == "metric"
            assert item.name == record["name"]
            assert item.metric_type == record.get("type", "gauge")
            assert item.value == (value["sum"] if isinstance(value, dict) else value)
        elif records_key == "logs":
            assert item.kind == "log"
            assert item.message == record["message"]
            assert item.level == attributes["level"].lower()
        else:
            assert item.kind == "span"
            assert item.name == attributes["name"]
            assert item.trace_id == record["trace.id"].rjust(32, "0")
            assert item.span_id == record["id"]
            assert item.parent_id == attributes.get("parent.id")


def test_account_id_events_path_and_single_object() -> None:
    parsed = newrelic.parse(
        b'{"eventType":"Purchase","amount":3,"timestamp":1796413846}',
        PayloadContext(path="/v1/accounts/12345/events"),
    )
    (item,) = parsed.items
    assert item.name == "Purchase"
    assert item.timestamp_ns == 1796413846 * 10**9  # seconds, told apart by magnitude
    assert item.tags["amount"] == "3"


def test_bare_log_objects() -> None:
    parsed = newrelic.parse_logs(
        b'[{"message":"a","logtype":"nginx","timestamp":1796413846000},{"message":"b"}]',
        PayloadContext(path="/log/v1"),
    )
    assert [(i.index, i.message) for i in parsed.items] == [(0, "a"), (1, "b")]
    assert parsed.items[0].tags["logtype"] == "nginx"
    assert parsed.items[0].timestamp_ns == 1796413846000 * 10**6


def test_common_timestamp_and_interval_are_defaults() -> None:
    body = json.dumps(
        [
            {
                "common": {"timestamp": 1796413846000, "interval.ms": 10000},
                "metrics": [{"name": "c", "type": "count", "value": 5}],
            }
        ]
    ).encode()
    (item,) = newrelic.parse_metrics(body, PayloadContext(path="/metric/v1")).items
    assert item.timestamp_ns == 1796413846000 * 10**6
    assert item.tags["interval.ms"] == "10000"


def test_zipkin_data_format() -> None:
    body = json.dumps(
        [{"traceId": "463ac35c9f6413ad", "id": "a2fb4a1d1a96d312", "name": "get", "timestamp": 1796413848374000}]
    ).encode()
    context = PayloadContext(path="/trace/v1", headers={"data-format": "zipkin", "data-format-version": "2"})
    (item,) = newrelic.parse(body, context).items
    assert item.trace_id == "0" * 16 + "463ac35c9f6413ad"
    assert item.timestamp_ns == 1796413848374000 * 1000


def test_span_error_attribute() -> None:
    body = b'[{"spans":[{"id":"1","trace.id":"not-hex","attributes":{"error":true}}]}]'
    (item,) = newrelic.parse_traces(body, PayloadContext(path="/trace/v1")).items
    assert item.level == "error"
    assert item.trace_id is None
    assert item.tags["trace.id"] == "not-hex"
    assert item.span_id == "0000000000000001"


@pytest.mark.parametrize(
    "parser, body, reason",
    [
        (newrelic.parse_metrics, b"{}", "blocks"),
        (newrelic.parse_metrics, b'[{"metrics":[{"name":"x","value":"1"}]}]', "number"),
        (newrelic.parse_metrics, b'[{"metrics":[{"name":"x","type":"count","value":1}]}]', "interval"),
        (newrelic.parse_metrics, b'[{"metrics":[{"name":"x","type":"histogram","value":1}]}]', "type"),
        (newrelic.parse_metrics, b'[{"metrics":[{"name":"x","value":1,"timestamp":1e300}]}]', "range"),
        (newrelic.parse_events, b'[{"amount":1}]', "eventType"),
        (newrelic.parse_traces, b'[{"spans":[{"id":1}]}]', "id"),
        (newrelic.parse_logs, b"[3]", "entry 0"),
    ],
)
def test_invalid_payloads(parser: Any, body: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as raised:
        parser(body, PayloadContext(path="/"))
    assert reason in raised.value.reason


def test_unknown_data_format() -> None:
    with pytest.raises(PayloadError):
        newrelic.parse_traces(b"[]", PayloadContext(path="/trace/v1", headers={"data-format": "jaeger"}))


def check_outcome(parser: Any, body: bytes, context: PayloadContext) -> None:
    try:
        parsed = parser(body, context)
    except PayloadError as error:
        assert error.reason
        return
    assert isinstance(parsed, ParsedPayload)
    assert [item.index for item in parsed.items] == list(range(len(parsed.items)))
    for item in parsed.items:
        assert item.kind in ITEM_KINDS
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in item.tags.items())


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)

RECORD = st.fixed_dictionaries(
    {},
    optional={
        "name": JSON_VALUES,
        "type": st.sampled_from(["gauge", "count", "summary"]) | JSON_VALUES,
        "value": JSON_VALUES | st.fixed_dictionaries({"sum": JSON_VALUES}),
        "timestamp": JSON_VALUES,
        "interval.ms": JSON_VALUES,
        "attributes": JSON_VALUES,
        "id": JSON_VALUES,
        "trace.id": JSON_VALUES,
        "message": JSON_VALUES,
        "eventType": JSON_VALUES,
    },
)
BLOCK = st.fixed_dictionaries(
    {},
    optional={
        "common": st.fixed_dictionaries({}, optional={"attributes": JSON_VALUES, "timestamp": JSON_VALUES})
        | JSON_VALUES,
        "metrics": st.lists(RECORD, max_size=3) | JSON_VALUES,
        "logs": st.lists(RECORD, max_size=3),
        "spans": st.lists(RECORD, max_size=3),
    },
)
DOCUMENTS = JSON_VALUES | st.lists(BLOCK, max_size=3) | st.lists(RECORD, max_size=3) | RECORD


@settings(deadline=500, max_examples=150)
@given(shape=st.sampled_from(sorted(newrelic.PARSERS)), body=st.binary(max_size=300))
def test_arbitrary_bytes(shape: str, body: bytes) -> None:
    check_outcome(newrelic.PARSERS[shape], body, PayloadContext(path="/"))


@settings(deadline=500, max_examples=300)
@given(shape=st.sampled_from(sorted(newrelic.PARSERS)), document=DOCUMENTS, zipkin=st.booleans())
def test_arbitrary_json(shape: str, document: Any, zipkin: bool) -> None:
    headers = {"data-format": "zipkin"} if zipkin else {}
    check_outcome(newrelic.PARSERS[shape], json.dumps(document).encode(), PayloadContext(path="/", headers=headers))
