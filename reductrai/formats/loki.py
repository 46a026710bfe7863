"""
Loki push requests parsed into items.

Three body forms are read, on any push path (C{/loki/api/v1/push},
C{/api/prom/push}):

  - protobuf C{logproto.PushRequest} (C{Content-Type:
    application/x-protobuf}), snappy already undone;
  - v1 JSON: C{{"streams": [{"stream": {label: value}, "values": [[ns,
    line], [ns, line, {structured metadata}], ...]}]}}, nanoseconds as a
    decimal string;
  - legacy v0 JSON: C{{"streams": [{"labels": "{k=\\"v\\"}", "entries":
    [{"ts": RFC3339, "line": text}]}]}}.

One item is one log entry (one C{values} element or one C{entries}
element), numbered across streams in wire order.  C{message} is the line,
C{tags} the stream labels with the entry's structured metadata over them,
C{service}, C{host} and C{level} come from the first of the usual label names
that is present (see L{SERVICE_LABELS}, L{HOST_LABELS}, L{LEVEL_LABELS}).
"""

from __future__ import annotations

import calendar
import re
from typing import Any, Mapping, Optional

from google.protobuf.message import DecodeError

from reductrai.formats import json_text
from reductrai.formats.items import LOG, Item, ParsedPayload, PayloadContext, PayloadError
from reductrai.proto import loki_push_pb2

#: Labels that name the service, in order of preference.
SERVICE_LABELS = ("service_name", "service", "app", "application", "job")
#: Labels that name the host, in order of preference.
HOST_LABELS = ("host", "hostname", "host_name", "instance", "node")
#: Labels that contain the level, in order of preference.
LEVEL_LABELS = ("level", "detected_level", "severity", "lvl", "loglevel")

_LEVEL_ALIASES = {"warning": "warn", "err": "error", "critical": "fatal"}

_NANOSECONDS_PER_SECOND = 1_000_000_000

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))\Z"
)

_LABEL_NAME = re.compile(r"\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*\"")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n", "t": "\t", "r": "\r"}


def is_protobuf(content_type: Optional[str]) -> bool:
    """
    Tell whether a push body is protobuf.

    @param content_type: the C{Content-Type} value, or L{None}.
    @return: C{True} for C{application/x-protobuf}, C{False} otherwise
        (JSON, which Loki also assumes when the header is missing or
        C{application/json}).
    """
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == "application/x-protobuf"


def parse(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a Loki push request.

    @param body: the decoded body (snappy or gzip already undone).
    @param context: the request; C{content_type} selects protobuf or JSON.
    @return: one item per log entry.
    @raise PayloadError: the body is not a valid push request: bad
        protobuf, bad JSON, a malformed stream, label string or timestamp.
    """
    if is_protobuf(context.content_type):
        return _parse_protobuf(body)
    return _parse_json(body)


def parse_label_string(text: str) -> dict[str, str]:
    """
    Parse a stream selector of the form C{{name="value", ...}}.

    @param text: the selector; values are double-quoted with backslash
        escapes (C{\\\\}, C{\\"}, C{\\n}, C{\\t}, C{\\r}).
    @return: the labels in order.
    @raise PayloadError: the text is not such a selector.
    """
    stripped = text.strip()
    if len(stripped) < 2 or stripped[0] != "{" or stripped[-1] != "}":
        raise PayloadError("stream labels must be enclosed in braces")
    inner = stripped[1:-1]
    labels: dict[str, str] = {}
    position = 0
    while inner[position:].strip():
        match = _LABEL_NAME.match(inner, position)
        if not match:
            raise PayloadError("invalid stream label name")
        position = match.end()
        value: list[str] = []
        while True:
            if position >= len(inner):
                raise PayloadError("unterminated stream label value")
            char = inner[position]
            if char == "\\":
                if position + 1 >= len(inner):
                    raise PayloadError("unterminated stream label value")
                escaped = inner[position + 1]
                value.append(_ESCAPES.get(escaped, escaped))
                position += 2
            elif char == '"':
                position += 1
                break
            else:
                value.append(char)
                position += 1
        labels[match.group(1)] = "".join(value)
        rest = inner[position:].lstrip()
        if rest.startswith(","):
            position = len(inner) - len(rest) + 1
        elif rest:
            raise PayloadError("stream labels must be separated by commas")
        else:
            break
    return labels


def parse_rfc3339_ns(text: str) -> int:
    """
    Read an RFC 3339 timestamp with up to nine fraction digits.

    @param text: for example C{2026-12-04T19:50:57.784253+00:00}.
    @return: nanoseconds since the epoch.
    @raise PayloadError: the text is not such a timestamp.
    """
    match = _RFC3339.match(text.strip())
    if not match:
        raise PayloadError("invalid RFC 3339 timestamp")
    year, month, day, hour, minute, second = (int(part) for part in match.group(1, 2, 3, 4, 5, 6))
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour <= 23 and minute <= 59 and second <= 60):
        raise PayloadError("invalid RFC 3339 timestamp")
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    if match.group(9):
        offset = int(match.group(10)) * 3600 + int(match.group(11)) * 60
        seconds -= offset if match.group(9) == "+" else -offset
    fraction = (match.group(7) or "").ljust(9, "0")
    return seconds * _NANOSECONDS_PER_SECOND + int(fraction)


def _first(labels: Mapping[str, str], names: tuple[str, ...]) -> Optional[str]:
    for name in names:
        value = labels.get(name)
        if value:
            return value
    return None


def _entry_item(
    index: int, labels: Mapping[str, str], timestamp_ns: int, line: str, metadata: Mapping[str, str]
) -> Item:
    tags = dict(labels)
    tags.update(metadata)
    level = _first(tags, LEVEL_LABELS)
    if level is not None:
        level = level.lower()
        level = _LEVEL_ALIASES.get(level, level)
    return Item(
        kind=LOG,
        index=index,
        timestamp_ns=timestamp_ns,
        service=_first(tags, SERVICE_LABELS),
        host=_first(tags, HOST_LABELS),
        level=level,
        message=line,
        tags=tags,
    )


def _parse_protobuf(body: bytes) -> ParsedPayload:
    request = loki_push_pb2.PushRequest()
    try:
        request.ParseFromString(body)
    except (DecodeError, RecursionError, ValueError):
        raise PayloadError("invalid Loki protobuf payload") from None
    items: list[Item] = []
    for stream in request.streams:
        labels = parse_label_string(stream.labels)
        for entry in stream.entries:
            timestamp_ns = entry.timestamp.seconds * _NANOSECONDS_PER_SECOND + entry.timestamp.nanos
            metadata = {pair.name: pair.value for pair in entry.structuredMetadata}
            items.append(_entry_item(len(items), labels, timestamp_ns, entry.line, metadata))
    return ParsedPayload(items=items)


def _parse_json(body: bytes) -> ParsedPayload:
    try:
        document = json_text.loads(body)
    except (ValueError, RecursionError):
        raise PayloadError("invalid JSON") from None
    if not isinstance(document, dict):
        raise PayloadError("Loki push payload must be a JSON object")
    streams = document.get("streams")
    if not isinstance(streams, list):
        raise PayloadError("Loki push payload is missing its streams array")
    items: list[Item] = []
    for stream in streams:
        if not isinstance(stream, dict):
            raise PayloadError("each Loki stream must be an object")
        if "stream" in stream or "values" in stream:
            _add_v1_stream(items, stream)
        elif "labels" in stream or "entries" in stream:
            _add_v0_stream(items, stream)
        else:
            raise PayloadError("Loki stream has neither stream/values nor labels/entries")
    return ParsedPayload(items=items)


def _string_map(value: Any, description: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise PayloadError(f"{description} must be an object of strings")
    return dict(value)


def _v1_timestamp(value: Any) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise PayloadError("Loki v1 timestamp must be a string of nanoseconds")


def _add_v1_stream(items: list[Item], stream: dict[str, Any]) -> None:
    labels = _string_map(stream.get("stream", {}), "stream labels")
    values = stream.get("values", [])
    if not isinstance(values, list):
        raise PayloadError("Loki stream values must be an array")
    for value in values:
        if not isinstance(value, list) or len(value) not in (2, 3) or not isinstance(value[1], str):
            raise PayloadError("Loki value must be [timestamp, line] or [timestamp, line, metadata]")
        metadata = _string_map(value[2], "structured metadata") if len(value) == 3 else {}
        items.append(_entry_item(len(items), labels, _v1_timestamp(value[0]), value[1], metadata))


def _add_v0_stream(items: list[Item], stream: dict[str, Any]) -> None:
    label_text = stream.get("labels", "{}")
    if not isinstance(label_text, str):
        raise PayloadError("Loki stream labels must be a string")
    labels = parse_label_string(label_text)
    entries = stream.get("entries", [])
    if not isinstance(entries, list):
        raise PayloadError("Loki stream entries must be an array")
    for entry in entries:
        if not isinstance(entry, dict):
            raise PayloadError("Loki entry must be an object")
        timestamp = entry.get("ts", entry.get("timestamp"))
        line = entry.get("line")
        if not isinstance(timestamp, str) or not isinstance(line, str):
            raise PayloadError("Loki entry needs a string ts and line")
        items.append(_entry_item(len(items), labels, parse_rfc3339_ns(timestamp), line, {}))
