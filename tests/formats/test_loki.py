"""
Tests for L{reductrai.formats.loki}.

The python-logging-loki corpus requests (v1 and legacy v0 JSON) are checked
against the JSON read here; protobuf push requests have no corpus and are
built with the generated classes.
"""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reductrai.formats import loki
from reductrai.formats.items import LOG, PayloadContext, PayloadError
from reductrai.proto import loki_push_pb2
from tests import corpus

CORPUS = corpus.load("python-logging-loki")

PROTOBUF = PayloadContext(path="/loki/api/v1/push", content_type="application/x-protobuf")
JSON = PayloadContext(path="/loki/api/v1/push", content_type="application/json")


def _datetime_ns(text: str) -> int:
    """
    Read an ISO 8601 timestamp with at most microseconds, as Python's
    isoformat() writes it, in nanoseconds.
    """
    moment = datetime.fromisoformat(text)
    seconds = int(moment.timestamp())
    return seconds * 1_000_000_000 + moment.microsecond * 1000


def _expected(document: dict) -> list[tuple[dict, int, str]]:
    entries = []
    for stream in document["streams"]:
        if "values" in stream:
            for timestamp, line in stream["values"]:
                entries.append((stream["stream"], int(timestamp), line))
        else:
            # The legacy labels string as python-logging-loki 0.3.1 writes it:
            # {k="v",k2="v2"} with no escapes in these captures.
            body = stream["labels"].strip("{}")
            labels = dict(pair.split("=", 1) for pair in body.split(","))
            labels = {k: v.strip('"') for k, v in labels.items()}
            for entry in stream["entries"]:
                entries.append((labels, _datetime_ns(entry["ts"]), entry["line"]))
    return entries


def test_corpus_has_all_requests():
    """
    The corpus folder contains 6 v1 and 3 legacy v0 requests.
    """
    assert len(CORPUS) == 9
    assert sum(1 for r in CORPUS if r.path == "/api/prom/push") == 3


@pytest.mark.parametrize("request_", CORPUS, ids=lambda r: r.name)
def test_corpus_requests(request_):
    """
    Every captured push parses into one item per entry, with the labels,
    timestamp and line read from the JSON.
    """
    context = PayloadContext(path=request_.path, content_type=request_.meta["content_type"])
    parsed = loki.parse(request_.body, context)
    expected = _expected(json.loads(request_.body))
    assert len(parsed.items) == len(expected) > 0
    for index, (item, (labels, timestamp, line)) in enumerate(zip(parsed.items, expected)):
        assert item.index == index
        assert item.kind == LOG
        assert item.message == line
        assert item.timestamp_ns == timestamp
        assert dict(item.tags) == labels
        assert item.service == labels["application"]
        assert item.host == labels["host"]
        # The Item model spells the warning level "warn".
        severity = labels["severity"].lower()
        assert item.level == {"warning": "warn"}.get(severity, severity)


def test_v1_structured_metadata_and_numbers():
    """
    A v1 value may carry structured metadata, which joins the tags, and
    the level may come from it.
    """
    document = {"streams": [
        {"stream": {"service_name": "api", "env": "test"},
         "values": [["1796413855014092288", "first"],
                    ["1796413855014092289", "second", {"level": "WARNING", "trace_id": "abc"}]]},
        {"stream": {"job": "batch"}, "values": [["1796413855014092290", "third"]]},
    ]}
    parsed = loki.parse(json.dumps(document).encode(), JSON)
    assert [(i.index, i.message, i.service, i.level) for i in parsed.items] == [
        (0, "first", "api", None), (1, "second", "api", "warn"), (2, "third", "batch", None)]
    assert parsed.items[1].tags == {"service_name": "api", "env": "test", "level": "WARNING", "trace_id": "abc"}
    assert parsed.items[1].timestamp_ns == 1796413855014092289


def test_protobuf_push():
    """
    A protobuf PushRequest gives one item per entry, with the labels string
    parsed (escapes included), the Timestamp in nanoseconds and structured
    metadata in the tags.
    """
    request = loki_push_pb2.PushRequest()
    stream = request.streams.add(labels='{app="fake-checkout", host="fake-host-01", msg="say \\"hi\\"\\n", level="error"}')
    first = stream.entries.add(line="payment failed")
    first.timestamp.seconds, first.timestamp.nanos = 1796413855, 14092288
    first.structuredMetadata.add(name="trace_id", value="0af7651916cd43dd8448eb211c80319c")
    second = stream.entries.add(line="retrying")
    second.timestamp.seconds = 1796413856
    other = request.streams.add(labels="{}")
    other.entries.add(line="no labels")
    parsed = loki.parse(request.SerializeToString(), PROTOBUF)

    expected = []
    for s in request.streams:
        for entry in s.entries:
            expected.append((entry.line, entry.timestamp.seconds * 10**9 + entry.timestamp.nanos))
    assert [(i.message, i.timestamp_ns) for i in parsed.items] == expected
    assert [i.index for i in parsed.items] == [0, 1, 2]
    first_item = parsed.items[0]
    assert first_item.tags == {"app": "fake-checkout", "host": "fake-host-01", "msg": 'say "hi"\n', "level": "error",
                               "trace_id": "0af7651916cd43dd8448eb211c80319c"}
    assert (first_item.service, first_item.host, first_item.level) == ("fake-checkout", "fake-host-01", "error")
    assert parsed.items[2].tags == {}


@pytest.mark.parametrize("labels", ['app="x"', '{app=x}', '{app="x" env="y"}', '{1app="x"}', '{app="x'])
def test_bad_label_strings(labels):
    """
    A malformed stream selector is a PayloadError.
    """
    with pytest.raises(PayloadError):
        loki.parse_label_string(labels)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-12-04T19:50:57.784253+00:00", "2026-12-04T19:50:57.784253+00:00"),
        ("2026-12-04T19:50:57Z", "2026-12-04T19:50:57+00:00"),
        ("2026-12-04T21:50:57.5+02:00", "2026-12-04T21:50:57.500000+02:00"),
    ],
)
def test_rfc3339(text, expected):
    """
    RFC 3339 timestamps with offsets and fractions read as nanoseconds.
    """
    assert loki.parse_rfc3339_ns(text) == _datetime_ns(expected)


def test_rfc3339_nanoseconds():
    """
    Nine fraction digits keep their nanoseconds.
    """
    assert loki.parse_rfc3339_ns("1970-01-01T00:00:01.000000007Z") == 1_000_000_007


@pytest.mark.parametrize(
    "document",
    [
        [],
        {"streams": {}},
        {"streams": [1]},
        {"streams": [{"other": 1}]},
        {"streams": [{"stream": {"a": 1}, "values": []}]},
        {"streams": [{"stream": {}, "values": [["not-a-number", "line"]]}]},
        {"streams": [{"stream": {}, "values": [["1", 2]]}]},
        {"streams": [{"labels": "{}", "entries": [{"ts": "yesterday", "line": "x"}]}]},
    ],
)
def test_invalid_json_pushes(document):
    """
    Wrong JSON shapes, labels, values and timestamps are PayloadErrors.
    """
    with pytest.raises(PayloadError):
        loki.parse(json.dumps(document).encode(), JSON)


@settings(deadline=500, max_examples=300)
@given(body=st.binary(max_size=512), context=st.sampled_from([PROTOBUF, JSON]))
def test_arbitrary_bytes(body, context):
    """
    Arbitrary bytes give a ParsedPayload or a PayloadError, nothing else.
    """
    try:
        loki.parse(body, context)
    except PayloadError as error:
        assert error.reason


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["streams", "stream", "values", "labels", "entries", "ts", "line", "a"]), children, max_size=4),
    max_leaves=30,
)


@settings(deadline=500, max_examples=300)
@given(document=JSON_VALUES)
def test_arbitrary_json(document):
    """
    Arbitrary JSON in push-like shapes gives a ParsedPayload or a
    PayloadError, nothing else.
    """
    try:
        loki.parse(json.dumps(document).encode(), JSON)
    except PayloadError as error:
        assert error.reason


@settings(deadline=500, max_examples=300)
@given(labels=st.text(max_size=40))
def test_arbitrary_label_strings(labels):
    """
    Arbitrary protobuf label strings give a ParsedPayload or a PayloadError.
    """
    request = loki_push_pb2.PushRequest()
    request.streams.add(labels=labels).entries.add(line="x")
    try:
        loki.parse(request.SerializeToString(), PROTOBUF)
    except PayloadError as error:
        assert error.reason
