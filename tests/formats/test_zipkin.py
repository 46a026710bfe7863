"""
Tests for L{reductrai.formats.zipkin}, on payloads shaped like those of
Zipkin's own clients (the corpus has no Zipkin capture).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from reductrai.formats import zipkin
from reductrai.formats.items import ITEM_KINDS, ParsedPayload, PayloadContext, PayloadError

CONTEXT = PayloadContext(path="/api/v2/spans", content_type="application/json")

#: A brave-style payload: a server span with a 128-bit trace id, a client
#: child with an error tag, and a 64-bit trace id span without timestamp.
SPANS = [
    {
        "traceId": "5af7183fb1d4cf5f5af7183fb1d4cf5f",
        "id": "352bff9a74ca9ad2",
        "kind": "SERVER",
        "name": "get /api",
        "timestamp": 1796413848374000,
        "duration": 207000,
        "localEndpoint": {"serviceName": "fake-checkout", "ipv4": "127.0.0.1", "port": 8080},
        "remoteEndpoint": {"ipv6": "::1", "port": 63720},
        "tags": {"http.method": "GET", "http.path": "/api"},
    },
    {
        "traceId": "5AF7183FB1D4CF5F5AF7183FB1D4CF5F",
        "parentId": "352bff9a74ca9ad2",
        "id": "6b221d5bc9e6496c",
        "kind": "CLIENT",
        "name": "select",
        "timestamp": 1796413848400000,
        "duration": 1500,
        "localEndpoint": {"serviceName": "fake-checkout"},
        "remoteEndpoint": {"serviceName": "postgres"},
        "tags": {"error": "", "db.statement": "select 1"},
        "annotations": [{"timestamp": 1796413848400100, "value": "ws"}],
        "shared": False,
    },
    {"traceId": "463ac35c9f6413ad", "id": "ab", "name": "local"},
]


def test_spans() -> None:
    """
    Each span gives one item whose fields match the JSON walked here.
    """
    parsed = zipkin.parse(json.dumps(SPANS).encode(), CONTEXT)
    assert len(parsed.items) == len(SPANS)
    for position, (item, span) in enumerate(zip(parsed.items, SPANS)):
        assert item.index == position
        assert item.kind == "span"
        assert item.trace_id == span["traceId"].lower().zfill(32)
        assert item.span_id == span["id"].zfill(16)
        assert item.parent_id == span.get("parentId")
        assert item.name == span["name"]
        assert item.service == span.get("localEndpoint", {}).get("serviceName")
        timestamp = span.get("timestamp")
        assert item.timestamp_ns == (None if timestamp is None else timestamp * 1000)
        assert item.level == ("error" if "error" in span.get("tags", {}) else None)
        for key, value in span.get("tags", {}).items():
            assert item.tags[key] == value
        if "kind" in span:
            assert item.tags["span.kind"] == span["kind"].lower()
        if "duration" in span:
            assert item.tags["duration_us"] == str(span["duration"])
    assert parsed.items[0].tags["local.ipv4"] == "127.0.0.1"
    assert parsed.items[1].tags["remote.service"] == "postgres"


def test_empty_list() -> None:
    assert zipkin.parse(b"[]", CONTEXT).items == []


@pytest.mark.parametrize(
    "spans, reason",
    [
        ({"traceId": "1", "id": "1"}, "list"),
        ([{"traceId": "abc", "id": "1"}], "traceId"),
        ([{"traceId": "z" * 16, "id": "1"}], "traceId"),
        ([{"traceId": "1" * 16, "id": "1" * 17}], "id"),
        ([{"traceId": "1" * 16, "id": "1", "parentId": ""}], "parentId"),
        ([{"traceId": "1" * 16, "id": "1", "timestamp": 1.5}], "timestamp"),
        ([{"traceId": "1" * 16, "id": "1", "tags": {"a": 1}}], "tags"),
        (["span"], "span 0"),
    ],
)
def test_invalid(spans: Any, reason: str) -> None:
    with pytest.raises(PayloadError) as raised:
        zipkin.parse(json.dumps(spans).encode(), CONTEXT)
    assert reason in raised.value.reason


def test_not_json() -> None:
    with pytest.raises(PayloadError):
        zipkin.parse(b"\x0a\x10not json", CONTEXT)


def check_outcome(body: bytes) -> None:
    try:
        parsed = zipkin.parse(body, CONTEXT)
    except PayloadError as error:
        assert error.reason
        return
    assert isinstance(parsed, ParsedPayload)
    assert [item.index for item in parsed.items] == list(range(len(parsed.items)))
    for item in parsed.items:
        assert item.kind in ITEM_KINDS
        assert item.trace_id is not None and len(item.trace_id) == 32
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
HEX = st.text(alphabet="0123456789abcdefABCDEF", min_size=0, max_size=33)
SPAN = st.fixed_dictionaries(
    {"traceId": HEX | JSON_VALUES, "id": HEX | JSON_VALUES},
    optional={
        "parentId": HEX | JSON_VALUES,
        "name": JSON_VALUES,
        "kind": JSON_VALUES,
        "timestamp": st.integers() | JSON_VALUES,
        "duration": st.integers() | JSON_VALUES,
        "localEndpoint": st.fixed_dictionaries({}, optional={"serviceName": JSON_VALUES, "port": JSON_VALUES})
        | JSON_VALUES,
        "remoteEndpoint": JSON_VALUES,
        "tags": st.dictionaries(st.text(max_size=5), st.text(max_size=5)) | JSON_VALUES,
    },
)


@settings(deadline=500, max_examples=150)
@given(body=st.binary(max_size=300))
def test_arbitrary_bytes(body: bytes) -> None:
    check_outcome(body)


@settings(deadline=500, max_examples=300)
@given(document=JSON_VALUES | st.lists(SPAN, max_size=4))
def test_arbitrary_json(document: Any) -> None:
    check_outcome(json.dumps(document).encode())
