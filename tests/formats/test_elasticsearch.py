"""
Tests for L{reductrai.formats.elasticsearch}: every captured
elasticsearch-py bulk request, the bulk response shape the capture server
gave, per-item errors, and property tests.
"""

from __future__ import annotations

import gzip
import json
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from reductrai.formats import elasticsearch
from reductrai.formats.items import ITEM_KINDS, ParsedPayload, PayloadContext, PayloadError
from tests import corpus

REQUESTS = corpus.load("elasticsearch-py")


def decoded_body(request: corpus.CapturedRequest) -> bytes:
    if request.header("Content-Encoding") == "gzip":
        return gzip.decompress(request.body)
    assert request.header("Content-Encoding") is None
    return request.body


def walk_bulk(body: bytes) -> list[tuple[str, dict[str, Any], Any]]:
    """
    Pair each action line with its source line, independently of the
    parser.
    """
    lines = [json.loads(line) for line in body.decode().splitlines() if line]
    pairs = []
    while lines:
        header = lines.pop(0)
        (action, metadata), = header.items()
        source = None if action == "delete" else lines.pop(0)
        pairs.append((action, metadata, source))
    return pairs


def iso_to_ns(text: str) -> int:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    whole = int(moment.timestamp())
    return whole * 10**9 + moment.microsecond * 1000


@pytest.mark.parametrize("request_", REQUESTS, ids=repr)
def test_corpus_request(request_: corpus.CapturedRequest) -> None:
    """
    One item per action, with the document fields walked here.
    """
    body = decoded_body(request_)
    pairs = walk_bulk(body)
    parsed = elasticsearch.parse(body, PayloadContext(path=request_.path))
    assert parsed.rejected == 0
    assert len(parsed.items) == len(pairs) > 0
    for position, (item, (action, metadata, source)) in enumerate(zip(parsed.items, pairs)):
        assert item.index == position
        assert item.tags["_action"] == action
        assert item.tags["_index"] == metadata["_index"]
        assert item.tags.get("_id") == metadata.get("_id")
        if action == "delete":
            assert item.kind == "metadata"
            continue
        document = source["doc"] if action == "update" else source
        assert item.kind == "log"
        assert item.message == document.get("message")
        if "@timestamp" in document:
            assert item.timestamp_ns == iso_to_ns(document["@timestamp"])
        assert item.service == document.get("service", {}).get("name")
        assert item.host == document.get("host", {}).get("name")
        assert item.level == document.get("log", {}).get("level")


@pytest.mark.parametrize("request_", REQUESTS, ids=repr)
def test_bulk_response_matches_capture(request_: corpus.CapturedRequest) -> None:
    """
    The built response has the capture's shape, item for item; only the
    generated C{_id}s differ.
    """
    captured = json.loads(request_.meta["response"]["body"])
    actions = elasticsearch.parse_actions(decoded_body(request_), PayloadContext(path=request_.path))
    built = elasticsearch.build_bulk_response(actions, captured["took"])
    assert (built["errors"], built["took"]) == (captured["errors"], captured["took"])
    assert len(built["items"]) == len(captured["items"])
    for mine, theirs in zip(built["items"], captured["items"]):
        assert mine.keys() == theirs.keys()
        (action,) = theirs
        assert mine[action].keys() == theirs[action].keys()
        for key, value in theirs[action].items():
            if key == "_id" and action == "index":
                assert len(mine[action]["_id"]) == len(value) == 20
            else:
                assert mine[action][key] == value
    from_parsed = elasticsearch.build_bulk_response(
        elasticsearch.parse(decoded_body(request_), PayloadContext(path=request_.path)), 7
    )
    assert [list(entry) for entry in from_parsed["items"]] == [list(entry) for entry in captured["items"]]


def test_malformed_source_is_a_per_item_error() -> None:
    body = (
        b'{"index":{"_index":"a"}}\n{"message":"ok"}\n'
        b'{"create":{"_index":"a","_id":"2"}}\n{not json\n'
        b'{"index":{}}\n["list"]\n'
        b'{"delete":{"_id":"3"}}\n'
    )
    context = PayloadContext(path="/default/_bulk")
    parsed = elasticsearch.parse(body, context)
    assert [item.index for item in parsed.items] == [0, 3]
    assert parsed.rejected == 2
    assert len(parsed.errors) == 2
    assert parsed.items[1].tags["_index"] == "default"
    response = elasticsearch.build_bulk_response(elasticsearch.parse_actions(body, context), 3)
    assert response["errors"] is True
    statuses = [(list(entry)[0], list(entry.values())[0]["status"]) for entry in response["items"]]
    assert statuses == [("index", 201), ("create", 400), ("index", 400), ("delete", 200)]
    assert response["items"][1]["create"]["_id"] == "2"
    assert response["items"][1]["create"]["error"]["type"] == "document_parsing_exception"
    rebuilt = elasticsearch.build_bulk_response(parsed, 3)
    assert [list(entry.values())[0]["status"] for entry in rebuilt["items"]] == [201, 400, 400, 200]


def test_crlf_and_blank_lines() -> None:
    body = b'\r\n{"index":{"_index":"a"}}\r\n{"@timestamp":1700000000000,"level":"WARN"}\r\n\r\n'
    (item,) = elasticsearch.parse(body, PayloadContext(path="/_bulk")).items
    assert item.timestamp_ns == 1700000000000 * 10**6
    assert item.level == "warn"


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"", "required"),
        (b"not json\n", "malformed action"),
        (b'{"index":{"_index":"a"},"x":1}\n{}\n', "malformed action"),
        (b'{"upsert":{"_index":"a"}}\n{}\n', "unknown action"),
        (b'{"index":{}}\n{}\n', "index is missing"),
        (b'{"index":{"_index":"a"}}\n', "missing source"),
        (b'{"update":{"_index":"a"}}\n{"doc":{}}\n', "_id"),
    ],
)
def test_whole_request_errors(body: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as raised:
        elasticsearch.parse(body, PayloadContext(path="/_bulk"))
    assert reason in raised.value.reason


def check_outcome(body: bytes) -> None:
    try:
        parsed = elasticsearch.parse(body, PayloadContext(path="/idx/_bulk"))
    except PayloadError as error:
        assert error.reason
        return
    assert isinstance(parsed, ParsedPayload)
    assert parsed.rejected == len(parsed.errors)
    indexes = [item.index for item in parsed.items]
    assert indexes == sorted(set(indexes))
    assert len(indexes) + parsed.rejected > 0
    for item in parsed.items:
        assert item.kind in ITEM_KINDS
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in item.tags.items())
    response = elasticsearch.build_bulk_response(parsed, 1)
    assert len(response["items"]) == len(parsed.items) + parsed.rejected
    json.dumps(response)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
ACTION_LINE = st.builds(
    lambda action, metadata: json.dumps({action: metadata}),
    st.sampled_from(["index", "create", "update", "delete", "other"]),
    st.fixed_dictionaries({}, optional={"_index": JSON_VALUES, "_id": JSON_VALUES}),
)
SOURCE_LINE = (
    st.fixed_dictionaries(
        {},
        optional={
            "@timestamp": JSON_VALUES,
            "message": JSON_VALUES,
            "log": JSON_VALUES,
            "doc": JSON_VALUES,
            "trace": st.fixed_dictionaries({"id": st.text(max_size=40)}),
        },
    ).map(json.dumps)
    | st.text(max_size=20)
)


@settings(deadline=500, max_examples=150)
@given(body=st.binary(max_size=300))
def test_arbitrary_bytes(body: bytes) -> None:
    check_outcome(body)


@settings(deadline=500, max_examples=300)
@given(lines=st.lists(ACTION_LINE | SOURCE_LINE | JSON_VALUES.map(json.dumps), max_size=8))
def test_arbitrary_ndjson(lines: list[str]) -> None:
    check_outcome("\n".join(line.replace("\n", " ") for line in lines).encode())
