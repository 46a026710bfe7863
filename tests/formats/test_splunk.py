"""
Tests for L{reductrai.formats.splunk}: every captured splunk-handler
request, stacked-object and raw edge cases, HEC error codes, and property
tests.
"""

from __future__ import annotations

import json
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from reductrai.formats import splunk
from reductrai.formats.items import ITEM_KINDS, ParsedPayload, PayloadContext, PayloadError
from tests import corpus

REQUESTS = corpus.load("splunk-handler")
EVENT_CONTEXT = PayloadContext(path="/services/collector/event")


def stacked_objects(text: str) -> list[dict[str, Any]]:
    """
    Split C{{...}{...}} independently: track brace depth outside strings.
    """
    objects, depth, start, in_string, escaped = [], 0, 0, False, False
    for position, character in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif character == "\\":
                escaped = True
            elif character == '"':
                in_string = False
        elif character == '"':
            in_string = True
        elif character == "{":
            if depth == 0:
                start = position
            depth += 1
        elif character == "}":
            depth -= 1
            if depth == 0:
                objects.append(json.loads(text[start : position + 1]))
    return objects


@pytest.mark.parametrize("request_", REQUESTS, ids=repr)
def test_corpus_request(request_: corpus.CapturedRequest) -> None:
    """
    Each captured HEC request parses into one item per stacked event.
    """
    assert request_.header("Content-Encoding") is None
    events = stacked_objects(request_.body.decode("utf-8"))
    parsed = splunk.parse(request_.body, PayloadContext(path=request_.path))
    assert len(parsed.items) == len(events) > 0
    for position, (item, event) in enumerate(zip(parsed.items, events)):
        assert item.index == position
        assert item.kind == "log"
        assert item.message == event["event"]
        assert item.host == event["host"]
        assert item.timestamp_ns == int(Fraction(repr(event["time"])) * 10**9)
        for field in ("source", "sourcetype", "index"):
            assert item.tags[field] == event[field]
        assert item.service == event["source"]


def test_corpus_has_a_batch() -> None:
    assert max(len(stacked_objects(r.body.decode())) for r in REQUESTS) == 3


@pytest.mark.parametrize("separator", ["", "\n", " \r\n\t "])
def test_separators(separator: str) -> None:
    events = [{"event": "a", "time": 1.5}, {"event": {"k": [1, 2]}, "time": "2"}, {"event": 7}]
    body = separator.join(json.dumps(event) for event in events).encode()
    parsed = splunk.parse_event(b"  " + body + b"\n", EVENT_CONTEXT)
    assert [item.message for item in parsed.items] == ["a", '{"k":[1,2]}', "7"]
    assert [item.timestamp_ns for item in parsed.items] == [1_500_000_000, 2_000_000_000, None]


def test_fields_and_query_defaults() -> None:
    context = PayloadContext(
        path="/services/collector", query={"host": ["qhost"], "sourcetype": ["qtype"], "index": ["qindex"]}
    )
    body = b'{"event":"x","fields":{"service":"svc","region":["eu","us"],"n":1},"index":"own"}'
    (item,) = splunk.parse(body, context).items
    assert item.host == "qhost"
    assert item.service == "svc"
    assert dict(item.tags) == {
        "service": "svc",
        "region": "eu,us",
        "n": "1",
        "sourcetype": "qtype",
        "index": "own",
    }


def test_raw_lines() -> None:
    context = PayloadContext(path="/services/collector/raw", query={"source": ["app"], "host": ["h"]})
    parsed = splunk.parse(b"line one\r\n\nline {two}\n", context)
    assert [(i.index, i.message, i.host, i.service) for i in parsed.items] == [
        (0, "line one", "h", "app"),
        (1, "line {two}", "h", "app"),
    ]


@pytest.mark.parametrize(
    "body, code, event_number",
    [
        (b"", 5, None),
        (b"  \n", 5, None),
        (b'{"event":"a"}{"event":', 6, 1),
        (b'{"event":"a"} [1]', 6, 1),
        (b'{"time":1}', 12, 0),
        (b'{"event":"a"}{"event":""}', 13, 1),
        (b'{"event":null}', 13, 0),
        (b'{"event":"a","fields":{"x":{"y":1}}}', 15, 0),
        (b'{"event":"a","index":5}', 7, 0),
        (b'{"event":"a","time":"soon"}', 6, 0),
        (b'{"event":"a","time":"1e999999999"}', 6, 0),
        (b"\xff", 6, None),
    ],
)
def test_hec_errors(body: bytes, code: int, event_number: Any) -> None:
    with pytest.raises(splunk.HecError) as raised:
        splunk.parse_event(body, EVENT_CONTEXT)
    error = raised.value
    assert isinstance(error, PayloadError)
    assert error.code == code
    assert error.invalid_event_number == event_number
    assert error.http_status == 400
    expected = {"text": splunk.HEC_ERRORS[code].text, "code": code}
    if event_number is not None:
        expected["invalid-event-number"] = event_number
    assert error.body() == expected


def test_error_table() -> None:
    """
    The table has Splunk's documented codes with their HTTP statuses.
    """
    documented = {
        0: (200, "Success"),
        2: (401, "Token is required"),
        3: (401, "Invalid authorization"),
        4: (403, "Invalid token"),
        5: (400, "No data"),
        6: (400, "Invalid data format"),
        7: (400, "Incorrect index"),
        9: (503, "Server is busy"),
        12: (400, "Event field is required"),
        13: (400, "Event field cannot be blank"),
    }
    for code, (status, text) in documented.items():
        assert (splunk.HEC_ERRORS[code].http_status, splunk.HEC_ERRORS[code].text) == (status, text)
    assert splunk.response_body(0) == {"text": "Success", "code": 0}


def check_outcome(parser: Any, body: bytes) -> None:
    try:
        parsed = parser(body, EVENT_CONTEXT)
    except PayloadError as error:
        assert error.reason
        if isinstance(error, splunk.HecError):
            assert error.code in splunk.HEC_ERRORS
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
EVENT = st.fixed_dictionaries(
    {},
    optional={
        "event": JSON_VALUES,
        "time": JSON_VALUES | st.text(alphabet="0123456789.e-+", max_size=12),
        "host": JSON_VALUES,
        "source": JSON_VALUES,
        "index": JSON_VALUES,
        "fields": st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3) | JSON_VALUES,
    },
)


@settings(deadline=500, max_examples=150)
@given(shape=st.sampled_from(sorted(splunk.PARSERS)), body=st.binary(max_size=300))
def test_arbitrary_bytes(shape: str, body: bytes) -> None:
    check_outcome(splunk.PARSERS[shape], body)


@settings(deadline=500, max_examples=300)
@given(
    shape=st.sampled_from(sorted(splunk.PARSERS)),
    events=st.lists(EVENT | JSON_VALUES, max_size=4),
    separator=st.sampled_from(["", " ", "\n"]),
)
def test_arbitrary_json(shape: str, events: list[Any], separator: str) -> None:
    check_outcome(splunk.PARSERS[shape], separator.join(json.dumps(e) for e in events).encode())
