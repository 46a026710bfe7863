"""
Tests for L{reductrai.formats.influx} on line protocol written the way
Telegraf and the InfluxDB client libraries write it (the corpus has no
InfluxDB capture), including escaping edge cases.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import assume, given, settings, strategies as st

from reductrai.formats import influx
from reductrai.formats.items import ITEM_KINDS, ParsedPayload, PayloadContext, PayloadError

V1 = PayloadContext(path="/write", query={"db": ["telegraf"]})
V2 = PayloadContext(path="/api/v2/write", query={"org": ["o"], "bucket": ["b"], "precision": ["ns"]})


def escape_key(text: str) -> str:
    return text.replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def escape_measurement(text: str) -> str:
    return text.replace(",", "\\,").replace(" ", "\\ ")


def escape_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_telegraf_batch() -> None:
    body = (
        b"cpu,cpu=cpu-total,host=fake-host-01 usage_idle=98.2,usage_user=1.1 1796413830000000000\n"
        b"mem,host=fake-host-01 used=123456i,available_percent=61.5,active=true 1796413830000000000\n"
        b"disk,host=fake-host-01,path=/ free=2u\n"
    )
    parsed = influx.parse(body, V1)
    assert [(i.index, i.name, i.value, i.timestamp_ns) for i in parsed.items] == [
        (0, "cpu.usage_idle", 98.2, 1796413830000000000),
        (1, "cpu.usage_user", 1.1, 1796413830000000000),
        (2, "mem.used", 123456.0, 1796413830000000000),
        (3, "mem.available_percent", 61.5, 1796413830000000000),
        (4, "mem.active", 1.0, 1796413830000000000),
        (5, "disk.free", 2.0, None),
    ]
    assert all(item.host == "fake-host-01" for item in parsed.items)
    assert all(item.metric_type == "gauge" and item.kind == "metric" for item in parsed.items)
    assert dict(parsed.items[0].tags) == {"cpu": "cpu-total", "host": "fake-host-01"}


@pytest.mark.parametrize(
    "measurement, tag_key, tag_value, field_key, string_value",
    [
        ("my measurement", "tag key", "tag,value", "field=key", 'say "hi"'),
        ("a,b", "k=1", "v 2", "f,3", "back\\slash"),
        ("m=x", "t", "v=w", "f", "ends with backslash\\"),
        ("ünïcode", "ключ", "値", "поле", "new, comma = space"),
    ],
)
def test_escaping_round_trip(
    measurement: str, tag_key: str, tag_value: str, field_key: str, string_value: str
) -> None:
    """
    Names and values escaped the way the client libraries escape them
    come back unescaped.
    """
    line = (
        f"{escape_measurement(measurement)},{escape_key(tag_key)}={escape_key(tag_value)},service=svc "
        f"{escape_key(field_key)}={escape_string(string_value)},n=-3i 42"
    )
    parsed = influx.parse_write_v2(line.encode(), V2)
    first, second = parsed.items
    assert first.name == f"{measurement}.{field_key}"
    assert first.message == string_value
    assert first.value is None
    assert dict(first.tags) == {tag_key: tag_value, "service": "svc"}
    assert first.service == "svc"
    assert (second.name, second.value, second.timestamp_ns) == (f"{measurement}.n", -3.0, 42)


@pytest.mark.parametrize(
    "context, precision, scale",
    [
        (V1, "n", 1),
        (V1, "u", 1_000),
        (V1, "ms", 1_000_000),
        (V1, "s", 1_000_000_000),
        (V1, "m", 60 * 1_000_000_000),
        (V1, "h", 3600 * 1_000_000_000),
        (V2, "ns", 1),
        (V2, "us", 1_000),
        (V2, "ms", 1_000_000),
        (V2, "s", 1_000_000_000),
    ],
)
def test_precision(context: PayloadContext, precision: str, scale: int) -> None:
    context = PayloadContext(path=context.path, query={"precision": [precision]})
    (item,) = influx.parse(b"m v=1 1700", context).items
    assert item.timestamp_ns == 1700 * scale


def test_v2_rejects_v1_precision() -> None:
    with pytest.raises(PayloadError):
        influx.parse(b"m v=1 1", PayloadContext(path="/api/v2/write", query={"precision": ["h"]}))


def test_comments_blank_lines_and_crlf() -> None:
    body = b"# header\r\n\r\n  m,t=1 v=1.5e3 -10\r\n"
    (item,) = influx.parse(body, V1).items
    assert (item.value, item.timestamp_ns, dict(item.tags)) == (1500.0, -10, {"t": "1"})


def test_backslash_before_ordinary_character_is_literal() -> None:
    (item,) = influx.parse(b"m,path=C:\\dir v=1", V1).items
    assert item.tags["path"] == "C:\\dir"


@pytest.mark.parametrize(
    "line",
    [
        b"m",
        b"m ",
        b"m v=",
        b"m v=abc",
        b"m v=1 notatime",
        b"m v=1 1 2",
        b"m,t v=1",
        b"m,t= v=1",
        b'm s="unterminated',
        b"m v=9223372036854775808i",
        b"m v=1e999",
        b"m v=NaN",
        b",t=1 v=1",
        b"m v=1 99999999999999999999",
        b"\xff v=1",
    ],
)
def test_malformed_lines(line: bytes) -> None:
    with pytest.raises(PayloadError):
        influx.parse(b"ok v=1\n" + line, V1)


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
        assert (item.value is None) != (item.message is None)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in item.tags.items())


@settings(deadline=500, max_examples=200)
@given(shape=st.sampled_from(sorted(influx.PARSERS)), body=st.binary(max_size=300))
def test_arbitrary_bytes(shape: str, body: bytes) -> None:
    check_outcome(influx.PARSERS[shape], body, PayloadContext(path="/"))


LINE_ALPHABET = st.sampled_from(list('ab ,=\\"#\n0123456789.-+eitfu'))


@settings(deadline=500, max_examples=300)
@given(
    shape=st.sampled_from(sorted(influx.PARSERS)),
    text=st.text(alphabet=LINE_ALPHABET, max_size=80),
    precision=st.sampled_from(["ns", "s", "h", "x"]),
)
def test_arbitrary_line_text(shape: str, text: str, precision: str) -> None:
    """
    Text made of the characters that matter to the grammar.
    """
    check_outcome(influx.PARSERS[shape], text.encode(), PayloadContext(path="/", query={"precision": [precision]}))


@settings(deadline=500, max_examples=200)
@given(
    measurement=st.text(min_size=1, max_size=10).filter(lambda s: "\n" not in s and "\r" not in s),
    tags=st.dictionaries(
        st.text(min_size=1, max_size=6).filter(lambda s: not set(s) & set("\n\r\\")),
        st.text(min_size=1, max_size=6).filter(lambda s: not set(s) & set("\n\r\\")),
        max_size=3,
    ),
    value=st.floats(allow_nan=False, allow_infinity=False),
    string=st.text(max_size=10).filter(lambda s: not set(s) & set("\n\r")),
    timestamp=st.integers(min_value=-(2**62), max_value=2**62),
)
def test_generated_lines_round_trip(
    measurement: str, tags: dict[str, str], value: float, string: str, timestamp: int
) -> None:
    """
    Lines written with the client libraries' escaping parse back to what
    was written.
    """
    assume(not measurement.startswith(("#", " ", "\t")) and "\\" not in measurement)
    tag_text = "".join(f",{escape_key(k)}={escape_key(v)}" for k, v in tags.items())
    line = f"{escape_measurement(measurement)}{tag_text} f={value!r},s={escape_string(string)} {timestamp}"
    first, second = influx.parse(line.encode(), V1).items
    assert (first.name, first.value, first.timestamp_ns) == (f"{measurement}.f", value, timestamp)
    assert (second.name, second.message) == (f"{measurement}.s", string)
    assert dict(first.tags) == tags
