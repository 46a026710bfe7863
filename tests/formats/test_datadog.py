"""
Tests for L{reductrai.formats.datadog}: every captured request of the two
Datadog Python libraries, hand-made edge cases, and property tests.
"""

from __future__ import annotations

import gzip
import json
import zlib
from fractions import Fraction
from typing import Any

import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from reductrai.formats import datadog
from reductrai.formats.items import (
    ITEM_KINDS,
    ParsedPayload,
    PayloadContext,
    PayloadError,
)
from tests import corpus

FOLDERS = ("datadog-api-client-python", "datadog-datadogpy")
REQUESTS = [request for folder in FOLDERS for request in corpus.load(folder)]


def decoded_body(request: corpus.CapturedRequest) -> bytes:
    """
    Undo the captured request's Content-Encoding with the standard
    libraries (zlib-wrapped deflate, gzip, zstd or zstd1).
    """
    encoding = (request.header("Content-Encoding") or "").lower()
    if encoding == "gzip":
        return gzip.decompress(request.body)
    if encoding == "deflate":
        return zlib.decompress(request.body)
    if encoding in ("zstd", "zstd1"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(request.body)
    assert encoding == "", encoding
    return request.body


def context_of(request: corpus.CapturedRequest) -> PayloadContext:
    query: dict[str, list[str]] = {}
    for name, value in request.meta["query_params"]:
        query.setdefault(name, []).append(value)
    return PayloadContext(path=request.path, content_type=request.meta["content_type"], query=query)


def seconds_to_ns(seconds: Any) -> int:
    """
    Exact nanoseconds for the decimal text of a JSON number of seconds.
    """
    return int(Fraction(str(seconds)) * 10**9)


def tag_map(tags: list[str]) -> dict[str, str]:
    """
    The expected tag mapping: first C{:} splits, repeated keys join.
    """
    result: dict[str, list[str]] = {}
    for tag in tags:
        key, _, value = tag.partition(":")
        result.setdefault(key, [])
        if value:
            result[key].append(value)
    return {key: ",".join(values) for key, values in result.items()}


def expected_series_points(document: dict[str, Any], version: int) -> list[dict[str, Any]]:
    """
    Walk a series payload independently and list the expected point fields.
    """
    expected = []
    v2_types = {0: None, 1: "count", 2: "rate", 3: "gauge"}
    for series in document["series"]:
        tags = series.get("tags") or []
        service = next((t.split(":", 1)[1] for t in tags if t.startswith("service:")), None)
        if version == 2:
            hosts = [r["name"] for r in series.get("resources", []) if r["type"] == "host"]
            host = hosts[0] if hosts else None
            metric_type = v2_types[series.get("type", 0)]
            points = [(p["timestamp"], p["value"]) for p in series["points"]]
        else:
            host = series.get("host")
            metric_type = series.get("type") or "gauge"
            points = [(p[0], p[1]) for p in series["points"]]
        for timestamp, value in points:
            if isinstance(value, list):
                value = sum(value)
                metric_type = "distribution"
            expected.append(
                {
                    "name": series["metric"],
                    "timestamp_ns": seconds_to_ns(timestamp),
                    "value": value,
                    "metric_type": metric_type,
                    "host": host,
                    "service": service,
                    "env": tag_map(tags).get("env"),
                }
            )
    return expected


def test_corpus_present() -> None:
    """
    Both Datadog corpus folders are loaded; the tests below use them all.
    """
    assert len(REQUESTS) == 18 + 9


@pytest.mark.parametrize("request_", REQUESTS, ids=repr)
def test_corpus_request(request_: corpus.CapturedRequest) -> None:
    """
    Every captured Datadog request parses, and the items match a walk of
    the JSON done here.
    """
    body = decoded_body(request_)
    document = json.loads(body)
    context = context_of(request_)
    parsed = datadog.parse(body, context)
    assert parsed.rejected == 0
    assert [item.index for item in parsed.items] == list(range(len(parsed.items)))
    path = request_.path
    if path in ("/api/v1/series", "/api/v2/series", "/api/v1/distribution_points"):
        expected = expected_series_points(document, 2 if path == "/api/v2/series" else 1)
        assert len(parsed.items) == len(expected) > 0
        for item, want in zip(parsed.items, expected):
            assert item.kind == "metric"
            assert item.name == want["name"]
            assert item.timestamp_ns == want["timestamp_ns"]
            assert item.value == pytest.approx(want["value"])
            assert item.metric_type == want["metric_type"]
            assert item.host == want["host"]
            assert item.service == want["service"]
            assert item.tags.get("env") == want["env"]
    elif path == "/api/v1/check_run":
        checks = document if isinstance(document, list) else [document]
        statuses = ["ok", "warning", "critical", "unknown"]
        assert len(parsed.items) == len(checks)
        for item, check in zip(parsed.items, checks):
            assert item.kind == "service_check"
            assert item.name == check["check"]
            assert item.host == check["host_name"]
            assert item.level == statuses[check["status"]]
            assert item.message == check["message"]
            assert dict(item.tags) == tag_map(check["tags"])
            want_time = check.get("timestamp")
            assert item.timestamp_ns == (None if want_time is None else want_time * 10**9)
    elif path == "/api/v1/events":
        (item,) = parsed.items
        assert item.kind == "event"
        assert (item.name, item.message, item.host) == (
            document["title"],
            document["text"],
            document["host"],
        )
        assert item.level == document["alert_type"]
        assert item.service == tag_map(document["tags"])["service"]
    elif path == "/api/v2/events":
        attributes = document["data"]["attributes"]
        (item,) = parsed.items
        assert (item.kind, item.name, item.message, item.host) == (
            "event",
            attributes["title"],
            attributes["message"],
            attributes["host"],
        )
        assert item.tags["category"] == attributes["category"]
    else:
        assert path in ("/api/v2/logs", "/v1/input")
        logs = document if isinstance(document, list) else [document]
        query_tags = ",".join(value for name, value in request_.meta["query_params"] if name == "ddtags")
        assert len(parsed.items) == len(logs)
        for item, log in zip(parsed.items, logs):
            assert item.kind == "log"
            assert item.message == log["message"]
            assert item.host == log["hostname"]
            assert item.service == log["service"]
            assert item.level == log.get("status")
            all_tags = [t for t in (query_tags + "," + log["ddtags"]).split(",") if t]
            for key, value in tag_map(all_tags).items():
                assert item.tags[key] == value
            assert item.tags["source"] == log["ddsource"]
            for key, value in log.items():
                if key not in ("message", "ddtags", "ddsource", "hostname", "service", "status"):
                    assert item.tags[key] == (value if isinstance(value, str) else json.dumps(value))


def test_datadogpy_float_timestamps_keep_microseconds() -> None:
    """
    datadogpy's float timestamps become exact nanoseconds (no float noise).
    """
    parsed = datadog.parse_series_v1(
        b'{"series":[{"metric":"m","points":[[1796413806.197092,1.5]],"host":null}]}',
        PayloadContext(path="/api/v1/series"),
    )
    (item,) = parsed.items
    assert item.timestamp_ns == 1796413806 * 10**9 + 197092 * 1000
    assert item.host is None
    assert item.metric_type == "gauge"


def test_v2_series_resources_and_unspecified_type() -> None:
    body = json.dumps(
        {
            "series": [
                {
                    "metric": "m",
                    "type": 0,
                    "resources": [{"type": "device", "name": "sda"}, {"type": "host", "name": "h1"}],
                    "points": [{"timestamp": 10, "value": 2}, {"timestamp": 20, "value": 3}],
                }
            ]
        }
    ).encode()
    parsed = datadog.parse_series_v2(body, PayloadContext(path="/api/v2/series"))
    assert [(i.index, i.host, i.metric_type, i.value) for i in parsed.items] == [
        (0, "h1", None, 2.0),
        (1, "h1", None, 3.0),
    ]
    assert parsed.items[0].tags["resource.device"] == "sda"


def test_repeated_tag_keys_keep_every_value() -> None:
    parsed = datadog.parse_series_v1(
        b'{"series":[{"metric":"m","points":[[1,1]],"tags":["team:a","team:b","flag"]}]}',
        PayloadContext(path="/api/v1/series"),
    )
    assert dict(parsed.items[0].tags) == {"team": "a,b", "flag": ""}


def test_log_single_object_and_trace_ids() -> None:
    body = json.dumps(
        {
            "message": "hello",
            "status": "WARN",
            "timestamp": 1796413826197,
            "dd.trace_id": "1234",
            "dd.span_id": "5678",
            "ddtags": "service:from-tag",
            "nested": {"a": 1},
        }
    ).encode()
    parsed = datadog.parse_logs_v2(body, PayloadContext(path="/api/v2/logs"))
    (item,) = parsed.items
    assert item.level == "warn"
    assert item.timestamp_ns == 1796413826197 * 10**6
    assert item.trace_id == format(1234, "032x")
    assert item.span_id == format(5678, "016x")
    assert item.service == "from-tag"
    assert item.tags["nested.a"] == "1"


def test_v1_input_plain_text_lines() -> None:
    context = PayloadContext(
        path="/v1/input",
        content_type="text/plain",
        query={"ddsource": ["nginx"], "service": ["web"], "ddtags": ["env:prod"]},
    )
    parsed = datadog.parse(b"first line\n\nsecond line\n", context)
    assert [(i.index, i.message, i.service) for i in parsed.items] == [
        (0, "first line", "web"),
        (1, "second line", "web"),
    ]
    assert parsed.items[1].tags["env"] == "prod"
    assert parsed.items[1].tags["source"] == "nginx"


@pytest.mark.parametrize(
    "parser, body, reason",
    [
        (datadog.parse_series_v1, b"{", "invalid JSON"),
        (datadog.parse_series_v1, b"[]", "series"),
        (datadog.parse_series_v1, b'{"series":[{"metric":"m","points":[[1]]}]}', "pairs"),
        (datadog.parse_series_v1, b'{"series":[{"metric":"m","points":[[NaN,1]]}]}', "invalid JSON"),
        (datadog.parse_series_v1, b'{"series":[{"metric":"m","type":"bogus","points":[]}]}', "type"),
        (datadog.parse_series_v1, b'{"series":[{"metric":"m","points":[[true,1]]}]}', "number"),
        (datadog.parse_series_v2, b'{"series":[{"metric":"m","type":7,"points":[]}]}', "type"),
        (datadog.parse_series_v2, b'{"series":[{"metric":"m","points":[{"timestamp":1e300,"value":1}]}]}', "range"),
        (datadog.parse_check_run, b'{"check":"c","status":9}', "status"),
        (datadog.parse_events_v1, b'[{"title":"t"}]', "event object"),
        (datadog.parse_logs_v2, b"[1]", "log 0"),
        (datadog.parse_events_v2, b'{"data":{"attributes":{"timestamp":"yesterday"}}}', "ISO 8601"),
    ],
)
def test_invalid_payloads(parser: Any, body: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as raised:
        parser(body, PayloadContext(path="/"))
    assert reason in raised.value.reason


def test_unknown_path() -> None:
    with pytest.raises(PayloadError):
        datadog.parse(b"{}", PayloadContext(path="/api/v0.2/traces"))


def check_outcome(parser: Any, body: bytes, context: PayloadContext) -> None:
    """
    The parser returns a well-formed L{ParsedPayload} or raises
    L{PayloadError}, nothing else.
    """
    try:
        parsed = parser(body, context)
    except PayloadError as error:
        assert isinstance(error.reason, str) and error.reason
        return
    assert isinstance(parsed, ParsedPayload)
    assert [item.index for item in parsed.items] == list(range(len(parsed.items)))
    for item in parsed.items:
        assert item.kind in ITEM_KINDS
        assert item.timestamp_ns is None or isinstance(item.timestamp_ns, int)
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

SERIES_LIKE = st.fixed_dictionaries(
    {},
    optional={
        "metric": st.text(max_size=10) | JSON_VALUES,
        "type": st.sampled_from(["gauge", "count", "rate", 0, 1, 2, 3, 4]) | JSON_VALUES,
        "host": st.none() | st.text(max_size=5) | JSON_VALUES,
        "tags": st.lists(st.text(max_size=10), max_size=4) | JSON_VALUES,
        "resources": st.lists(
            st.fixed_dictionaries({"type": st.sampled_from(["host", "device"]) | JSON_VALUES, "name": JSON_VALUES}),
            max_size=3,
        )
        | JSON_VALUES,
        "points": st.lists(
            st.lists(JSON_VALUES, max_size=3)
            | st.fixed_dictionaries({"timestamp": JSON_VALUES, "value": JSON_VALUES})
            | st.tuples(st.floats(allow_nan=False, allow_infinity=False), st.lists(st.integers(), max_size=3)).map(list),
            max_size=4,
        )
        | JSON_VALUES,
    },
)

LOG_LIKE = st.fixed_dictionaries(
    {},
    optional={
        "message": JSON_VALUES,
        "ddtags": st.text(max_size=20) | JSON_VALUES,
        "status": JSON_VALUES,
        "timestamp": JSON_VALUES,
        "hostname": JSON_VALUES,
        "service": JSON_VALUES,
        "check": JSON_VALUES,
        "title": JSON_VALUES,
        "date_happened": JSON_VALUES,
        "dd.trace_id": st.text(alphabet="0123456789", max_size=45) | JSON_VALUES,
    },
)

DOCUMENTS = (
    JSON_VALUES
    | st.fixed_dictionaries({"series": st.lists(SERIES_LIKE, max_size=3)})
    | st.lists(LOG_LIKE, max_size=3)
    | LOG_LIKE
    | st.fixed_dictionaries({"data": st.fixed_dictionaries({"attributes": LOG_LIKE})})
)


@settings(deadline=500, max_examples=150)
@given(shape=st.sampled_from(sorted(datadog.PARSERS)), body=st.binary(max_size=300))
def test_arbitrary_bytes(shape: str, body: bytes) -> None:
    check_outcome(datadog.PARSERS[shape], body, PayloadContext(path="/"))


@settings(deadline=500, max_examples=300)
@given(shape=st.sampled_from(sorted(datadog.PARSERS)), document=DOCUMENTS)
def test_arbitrary_json(shape: str, document: Any) -> None:
    check_outcome(datadog.PARSERS[shape], json.dumps(document).encode(), PayloadContext(path="/"))
