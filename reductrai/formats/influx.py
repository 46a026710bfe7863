"""
Parser for InfluxDB line protocol, on C{/write} (InfluxDB 1.x) and
C{/api/v2/write} (InfluxDB 2.x).

A line is C{measurement[,tag=value...] field=value[,field=value...]
[timestamp]}.  Empty lines and lines starting with C{#} are skipped.
Escaping, as InfluxDB applies it:

    - in the measurement, a backslash escapes a comma or a space;
    - in tag keys, tag values and field keys, a backslash escapes a comma,
      an equals sign or a space;
    - in a double-quoted string field value, a backslash escapes a double
      quote or a backslash;
    - any other backslash is literal, but still keeps the character after
      it from ending the token (as InfluxDB's scanner does).

One item is one field of one line, in wire order: a L{METRIC} named
C{measurement.field} (the Telegraf convention for Datadog and Graphite
outputs), with the line's tags as C{tags}, C{host} and C{service} from
the C{host} and C{service} tags, C{metric_type} C{"gauge"} (line protocol
has no metric types), and:

    - float, integer (C{i} suffix) and unsigned (C{u} suffix) fields as
      C{value};
    - booleans as C{value} 1.0 or 0.0;
    - strings as C{message}, with no C{value}.

C{timestamp_ns} is the line's timestamp scaled by the C{precision} query
parameter (1.x: C{n}/C{ns}, C{u}/C{us}, C{ms}, C{s}, C{m}, C{h}; 2.x:
C{ns}, C{us}, C{ms}, C{s}; nanoseconds when absent), or L{None} for a
line without one (the server's clock applies).

InfluxDB writes the valid lines of a request with a bad line and answers
400 "partial write"; this parser instead rejects the whole payload, so
that nothing is forwarded for a request the client sees rejected.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Optional

from reductrai.formats.items import METRIC, Item, ParsedPayload, PayloadContext, PayloadError

#: C{precision} values of the 1.x C{/write} endpoint, in nanoseconds.
V1_PRECISIONS: Mapping[str, int] = {
    "n": 1,
    "ns": 1,
    "u": 1_000,
    "us": 1_000,
    "µ": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}

#: C{precision} values of the 2.x C{/api/v2/write} endpoint, in nanoseconds.
V2_PRECISIONS: Mapping[str, int] = {
    "ns": 1,
    "us": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
}

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_UINT64_MAX = (1 << 64) - 1

_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[+-]?[0-9]+i")
_UNSIGNED = re.compile(r"[0-9]+u")
_TIMESTAMP = re.compile(r"-?[0-9]+")
_TRUE = frozenset({"t", "T", "true", "True", "TRUE"})
_FALSE = frozenset({"f", "F", "false", "False", "FALSE"})

_MEASUREMENT_ESCAPES = frozenset(", ")
_KEY_ESCAPES = frozenset(",= ")


class _LineError(Exception):
    """
    A line is malformed. The exception message gives the reason.
    """


def _scan(line: str, position: int, stops: str, escapes: frozenset[str]) -> tuple[str, int]:
    """
    Read a token from C{position} up to the first unescaped character of
    C{stops}, undoing the backslash escapes of C{escapes}.

    @return: the token and the position of the stop character (or the end
        of the line).
    """
    characters = []
    length = len(line)
    while position < length:
        character = line[position]
        if character == "\\" and position + 1 < length:
            following = line[position + 1]
            if following in escapes:
                characters.append(following)
            else:
                characters.append(character)
                characters.append(following)
            position += 2
            continue
        if character in stops:
            break
        characters.append(character)
        position += 1
    return "".join(characters), position


def _scan_string(line: str, position: int) -> tuple[str, int]:
    """
    Read a double-quoted string field value; C{position} is just after the
    opening quote.

    @return: the unescaped string and the position after the closing quote.
    """
    characters = []
    length = len(line)
    while position < length:
        character = line[position]
        if character == "\\" and position + 1 < length and line[position + 1] in '"\\':
            characters.append(line[position + 1])
            position += 2
            continue
        if character == '"':
            return "".join(characters), position + 1
        characters.append(character)
        position += 1
    raise _LineError("unterminated string field value")


def _field_value(text: str) -> float:
    """
    Convert an unquoted field value (float, integer, unsigned or boolean)
    to a float.
    """
    if _INTEGER.fullmatch(text):
        number = int(text[:-1])
        if not _INT64_MIN <= number <= _INT64_MAX:
            raise _LineError("integer field value out of range")
        return float(number)
    if _UNSIGNED.fullmatch(text):
        number = int(text[:-1])
        if number > _UINT64_MAX:
            raise _LineError("unsigned field value out of range")
        return float(number)
    if text in _TRUE:
        return 1.0
    if text in _FALSE:
        return 0.0
    if _FLOAT.fullmatch(text):
        number = float(text)
        if number in (float("inf"), float("-inf")):
            raise _LineError("float field value out of range")
        return number
    raise _LineError(f"invalid field value {text!r}")


Field = tuple[str, Optional[float], Optional[str]]


def parse_line(line: str) -> tuple[str, dict[str, str], list[Field], Optional[int]]:
    """
    Parse one line of line protocol.

    @param line: the line, without its newline.
    @return: the measurement, the tags, the fields as (key, numeric value,
        string value) in wire order, and the raw timestamp or L{None}.
    @raise _LineError: the line is malformed.
    """
    measurement, position = _scan(line, 0, ", ", _MEASUREMENT_ESCAPES)
    if not measurement:
        raise _LineError("missing measurement")
    length = len(line)
    tags: dict[str, str] = {}
    while position < length and line[position] == ",":
        key, position = _scan(line, position + 1, "=, ", _KEY_ESCAPES)
        if not key or position >= length or line[position] != "=":
            raise _LineError("missing tag key or value")
        value, position = _scan(line, position + 1, ", ", _KEY_ESCAPES)
        if not value:
            raise _LineError("missing tag value")
        tags[key] = value
    while position < length and line[position] == " ":
        position += 1
    fields: list[Field] = []
    while True:
        key, position = _scan(line, position, "=, ", _KEY_ESCAPES)
        if not key or position >= length or line[position] != "=":
            raise _LineError("missing field key or value")
        position += 1
        if position < length and line[position] == '"':
            text, position = _scan_string(line, position + 1)
            fields.append((key, None, text))
        else:
            raw, position = _scan(line, position, ", ", frozenset())
            fields.append((key, _field_value(raw), None))
        if position < length and line[position] == ",":
            position += 1
            continue
        if position < length and line[position] != " ":
            raise _LineError("invalid field set")
        break
    rest = line[position:].strip(" \t\r")
    if not rest:
        return measurement, tags, fields, None
    if not _TIMESTAMP.fullmatch(rest):
        raise _LineError("invalid timestamp")
    return measurement, tags, fields, int(rest)


def _parse(body: bytes, context: PayloadContext, precisions: Mapping[str, int]) -> ParsedPayload:
    precision_values = context.query.get("precision")
    precision = precision_values[-1] if precision_values else "ns"
    if precision not in precisions:
        raise PayloadError(f"invalid precision {precision!r}")
    scale = precisions[precision]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PayloadError("body is not UTF-8") from error
    items: list[Item] = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        stripped = line.lstrip(" \t")
        if not stripped or stripped.startswith("#"):
            continue
        try:
            measurement, tags, fields, timestamp = parse_line(stripped)
        except _LineError as error:
            raise PayloadError(f"unable to parse line {line_number}: {error}") from None
        timestamp_ns = None
        if timestamp is not None:
            timestamp_ns = timestamp * scale
            if not _INT64_MIN <= timestamp_ns <= _INT64_MAX:
                raise PayloadError(f"timestamp out of range on line {line_number}")
        for key, number, string in fields:
            items.append(
                Item(
                    kind=METRIC,
                    index=len(items),
                    timestamp_ns=timestamp_ns,
                    name=f"{measurement}.{key}",
                    service=tags.get("service"),
                    host=tags.get("host"),
                    message=string,
                    value=number,
                    metric_type="gauge",
                    tags=dict(tags),
                )
            )
    return ParsedPayload(items)


def parse_write_v1(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a C{/write} (InfluxDB 1.x) body: one L{METRIC} item per field.

    @param body: the decoded request body.
    @param context: the request; its C{precision} query parameter scales
        the timestamps.
    @return: the fields in wire order.
    @raise PayloadError: a line is malformed or the precision is unknown.
    """
    return _parse(body, context, V1_PRECISIONS)


def parse_write_v2(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a C{/api/v2/write} (InfluxDB 2.x) body: one L{METRIC} item per
    field.

    @param body: the decoded request body.
    @param context: the request; its C{precision} query parameter scales
        the timestamps.
    @return: the fields in wire order.
    @raise PayloadError: a line is malformed or the precision is unknown.
    """
    return _parse(body, context, V2_PRECISIONS)


Parser = Callable[[bytes, PayloadContext], ParsedPayload]

#: Route-shape name to parser.
PARSERS: Mapping[str, Parser] = {"write_v1": parse_write_v1, "write_v2": parse_write_v2}

#: Request path to route-shape name.
ROUTES: Mapping[str, str] = {"/write": "write_v1", "/api/v2/write": "write_v2"}


def parse(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a payload with the parser for C{context.path} (see L{ROUTES}).

    @raise PayloadError: the path is not an InfluxDB write route, or the
        payload is invalid.
    """
    shape = ROUTES.get(context.path.rstrip("/"))
    if shape is None:
        raise PayloadError("not an InfluxDB write route")
    return PARSERS[shape](body, context)
