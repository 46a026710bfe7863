"""
Parsers for New Relic's JSON ingest APIs.

Route shapes (keys of L{PARSERS}) and the paths they serve:

    - C{metrics}: C{/metric/v1}.  C{[{"common": {...}, "metrics": [...]}]}.
      One item per metric: C{name}, C{value} (a summary's C{sum}),
      C{metric_type} (C{type}, default C{"gauge"}; C{"count"} and
      C{"summary"} need C{interval.ms} on the metric or in C{common}).
    - C{logs}: C{/log/v1}.  Blocks C{[{"common": {...}, "logs": [...]}]},
      or bare log objects (a list of them, or one).  One item per log:
      C{message}, C{level} from the C{level} or C{log.level} attribute.
    - C{traces}: C{/trace/v1}.  With C{Data-Format: newrelic} (the
      default), blocks C{[{"common": {...}, "spans": [...]}]}: one item
      per span, C{span_id} from C{id}, C{trace_id} from C{trace.id},
      C{name}, C{parent.id}, C{duration.ms} and C{error} from the
      attributes.  With C{Data-Format: zipkin}, a Zipkin JSON v2 span list
      (see L{reductrai.formats.zipkin}).
    - C{events}: C{/v1/accounts/{accountId}/events} and
      C{/v1/accounts/events}.  A bare JSON array of event objects (or one
      object), each with an C{eventType}, which is the item's C{name}.

Item indexes count items across every block of the payload, in wire order.
A block's C{common.attributes} are merged under each record's own
C{attributes} (the record wins); C{common.timestamp} and
C{common.interval.ms} are defaults.  Every merged attribute becomes a tag
(nested values as compact JSON); C{service} comes from C{service.name}
(or C{service}), C{host} from C{host.name}, C{hostname} or C{host}.

Timestamps are milliseconds since the epoch as the SDKs send them; New
Relic also accepts seconds, microseconds and nanoseconds, distinguished by
magnitude, and this parser does the same: below 10**11 seconds, below 10**14
milliseconds, below 10**17 microseconds, otherwise nanoseconds.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Mapping, Optional

from reductrai.formats import zipkin
from reductrai.formats import json_text
from reductrai.formats.items import (
    EVENT,
    LOG,
    METRIC,
    SPAN,
    Item,
    ParsedPayload,
    PayloadContext,
    PayloadError,
)

#: Metric types the Metric API accepts.
METRIC_TYPES = frozenset({"gauge", "count", "summary"})

_INT64_MAX = (1 << 63) - 1
_HEX = re.compile(r"[0-9a-fA-F]+")



def _load_json(body: bytes) -> Any:
    try:
        return json_text.loads(body, reject_constants=True)
    except (ValueError, RecursionError) as error:
        raise PayloadError("invalid JSON") from error


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def timestamp_to_nanoseconds(value: Any, label: str = "timestamp") -> int:
    """
    Convert a New Relic epoch timestamp to integer nanoseconds, telling
    seconds, milliseconds, microseconds and nanoseconds apart by magnitude.

    @param value: the JSON number.
    @param label: the field name for the error reason.
    @return: nanoseconds since the epoch.
    @raise PayloadError: C{value} is not a number or is out of range.
    """
    if not _is_number(value):
        raise PayloadError(f"{label} must be a number")
    try:
        exact = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        magnitude = abs(exact)
        if magnitude < 10**11:
            nanoseconds = int(exact * 10**9)
        elif magnitude < 10**14:
            nanoseconds = int(exact * 10**6)
        elif magnitude < 10**17:
            nanoseconds = int(exact * 10**3)
        else:
            nanoseconds = int(exact)
    except (InvalidOperation, ValueError, OverflowError) as error:
        raise PayloadError(f"{label} is out of range") from error
    if abs(nanoseconds) > _INT64_MAX:
        raise PayloadError(f"{label} is out of range")
    return nanoseconds


def _flatten(prefix: str, value: Any, into: dict[str, str]) -> None:
    if isinstance(value, str):
        into[prefix] = value
    else:
        into[prefix] = json.dumps(value, separators=(",", ":"))


def _attributes(value: Any, label: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PayloadError(f"{label} attributes must be an object")
    return value


def _tags(attributes: Mapping[str, Any]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for key, value in attributes.items():
        _flatten(key, value, tags)
    return tags


def _string_attribute(attributes: Mapping[str, Any], *names: str) -> Optional[str]:
    for name in names:
        value = attributes.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def _blocks(document: Any, records_key: str) -> list[tuple[dict[str, Any], list[Any]]]:
    """
    Split a C{[{"common": ..., records_key: [...]}]} payload into pairs of
    (common object, record list).
    """
    if not isinstance(document, list):
        raise PayloadError(f'expected a JSON list of {{"common", "{records_key}"}} blocks')
    blocks = []
    for position, block in enumerate(document):
        if not isinstance(block, dict):
            raise PayloadError(f"block {position} must be an object")
        common = block.get("common") or {}
        if not isinstance(common, dict):
            raise PayloadError(f"block {position} common must be an object")
        records = block.get(records_key, [])
        if not isinstance(records, list):
            raise PayloadError(f"block {position} {records_key} must be a list")
        blocks.append((common, records))
    return blocks


def _merged(common: Mapping[str, Any], record: Mapping[str, Any], label: str) -> dict[str, Any]:
    merged = dict(_attributes(common.get("attributes"), "common"))
    merged.update(_attributes(record.get("attributes"), label))
    return merged


def _timestamp(record: Mapping[str, Any], common: Mapping[str, Any], label: str) -> Optional[int]:
    value = record.get("timestamp", common.get("timestamp"))
    return None if value is None else timestamp_to_nanoseconds(value, f"{label} timestamp")


def parse_metrics(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a C{/metric/v1} payload: one L{METRIC} item per metric.

    @param body: the decoded request body.
    @param context: the request's path, query and headers (unused).
    @return: the metrics, block by block, in wire order.
    @raise PayloadError: the payload or one of its metrics is invalid.
    """
    items: list[Item] = []
    for common, records in _blocks(_load_json(body), "metrics"):
        for record in records:
            label = f"metric {len(items)}"
            if not isinstance(record, dict):
                raise PayloadError(f"{label} must be an object")
            name = record.get("name")
            if not isinstance(name, str) or not name:
                raise PayloadError(f"{label} has no name")
            metric_type = record.get("type", "gauge")
            if metric_type not in METRIC_TYPES:
                raise PayloadError(f"{label} has an unknown type")
            raw_value = record.get("value")
            if metric_type == "summary":
                if not isinstance(raw_value, dict) or not _is_number(raw_value.get("sum")):
                    raise PayloadError(f"{label} summary value needs a numeric sum")
                raw_value = raw_value["sum"]
            if not _is_number(raw_value):
                raise PayloadError(f"{label} value must be a number")
            interval = record.get("interval.ms", common.get("interval.ms"))
            if metric_type != "gauge" and not _is_number(interval):
                raise PayloadError(f"{label} needs interval.ms")
            attributes = _merged(common, record, label)
            tags = _tags(attributes)
            if interval is not None:
                tags["interval.ms"] = json.dumps(interval)
            try:
                value = float(raw_value)
            except OverflowError as error:
                raise PayloadError(f"{label} value is out of range") from error
            items.append(
                Item(
                    kind=METRIC,
                    index=len(items),
                    timestamp_ns=_timestamp(record, common, label),
                    name=name,
                    service=_string_attribute(attributes, "service.name", "service"),
                    host=_string_attribute(attributes, "host.name", "hostname", "host"),
                    value=value,
                    metric_type=metric_type,
                    tags=tags,
                )
            )
    return ParsedPayload(items)


def _log_item(record: Any, common: Mapping[str, Any], index: int) -> Item:
    label = f"log {index}"
    if not isinstance(record, dict):
        raise PayloadError(f"{label} must be an object")
    attributes = _merged(common, record, label)
    for key, value in record.items():
        if key not in ("attributes", "message", "timestamp"):
            attributes.setdefault(key, value)
    message = record.get("message")
    if message is not None and not isinstance(message, str):
        message = json.dumps(message, separators=(",", ":"))
    level = _string_attribute(attributes, "level", "log.level")
    return Item(
        kind=LOG,
        index=index,
        timestamp_ns=_timestamp(record, common, label),
        service=_string_attribute(attributes, "service.name", "service"),
        host=_string_attribute(attributes, "host.name", "hostname", "host"),
        level=level.lower() if level else None,
        trace_id=_hex_id(attributes.get("trace.id"), 32),
        span_id=_hex_id(attributes.get("span.id"), 16),
        message=message,
        tags=_tags(attributes),
    )


def parse_logs(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a C{/log/v1} payload: one L{LOG} item per log, from
    C{{"common", "logs"}} blocks or bare log objects.  A bare log's fields
    other than C{message} and C{timestamp} count as attributes.

    @param body: the decoded request body.
    @param context: the request's path, query and headers (unused).
    @return: the logs, in wire order.
    @raise PayloadError: the payload or one of its logs is invalid.
    """
    document = _load_json(body)
    entries = document if isinstance(document, list) else [document]
    items: list[Item] = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise PayloadError(f"entry {position} must be an object")
        if "logs" in entry or "common" in entry:
            for common, records in _blocks([entry], "logs"):
                for record in records:
                    items.append(_log_item(record, common, len(items)))
        else:
            items.append(_log_item(entry, {}, len(items)))
    return ParsedPayload(items)


def _hex_id(value: Any, width: int) -> Optional[str]:
    """
    Return a hex id zero-padded to C{width} digits, or L{None} when
    C{value} is not a hex string of at most C{width} digits.
    """
    if isinstance(value, str) and len(value) <= width and _HEX.fullmatch(value):
        return value.lower().rjust(width, "0")
    return None


def parse_traces(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a C{/trace/v1} payload: one L{SPAN} item per span.

    C{Data-Format: zipkin} selects L{reductrai.formats.zipkin.parse};
    otherwise (C{newrelic} or no header) the New Relic span format.  A
    C{trace.id} or C{id} that is not hex of at most 32 / 16 digits is kept
    only as a tag.  The level is C{"error"} when the C{error} attribute is
    present and not C{false}.

    @param body: the decoded request body.
    @param context: the request; its C{data-format} header picks the
        format.
    @return: the spans, block by block, in wire order.
    @raise PayloadError: the payload or one of its spans is invalid, or
        the data format is unknown.
    """
    data_format = context.headers.get("data-format", "newrelic").strip().lower()
    if data_format == "zipkin":
        return zipkin.parse(body, context)
    if data_format != "newrelic":
        raise PayloadError("unsupported Data-Format")
    items: list[Item] = []
    for common, records in _blocks(_load_json(body), "spans"):
        for record in records:
            label = f"span {len(items)}"
            if not isinstance(record, dict):
                raise PayloadError(f"{label} must be an object")
            span_id = record.get("id")
            trace_id = record.get("trace.id")
            if not isinstance(span_id, str) or not isinstance(trace_id, str):
                raise PayloadError(f"{label} needs string id and trace.id")
            attributes = _merged(common, record, label)
            tags = _tags(attributes)
            tags["id"] = span_id
            tags["trace.id"] = trace_id
            error = attributes.get("error")
            name = attributes.get("name")
            items.append(
                Item(
                    kind=SPAN,
                    index=len(items),
                    timestamp_ns=_timestamp(record, common, label),
                    name=name if isinstance(name, str) else None,
                    service=_string_attribute(attributes, "service.name", "service"),
                    host=_string_attribute(attributes, "host.name", "hostname", "host"),
                    level="error" if error is not None and error is not False else None,
                    trace_id=_hex_id(trace_id, 32),
                    span_id=_hex_id(span_id, 16),
                    parent_id=_hex_id(attributes.get("parent.id"), 16),
                    tags=tags,
                )
            )
    return ParsedPayload(items)


def parse_events(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse an Event API payload (a JSON array of event objects, or one
    object): one L{EVENT} item per event, named by C{eventType}, with
    every other field as a tag.

    @param body: the decoded request body.
    @param context: the request's path, query and headers (unused).
    @return: the events, in wire order.
    @raise PayloadError: the payload or one of its events is invalid.
    """
    document = _load_json(body)
    records = document if isinstance(document, list) else [document]
    items: list[Item] = []
    for position, record in enumerate(records):
        label = f"event {position}"
        if not isinstance(record, dict):
            raise PayloadError(f"{label} must be an object")
        event_type = record.get("eventType")
        if not isinstance(event_type, str) or not event_type:
            raise PayloadError(f"{label} needs an eventType")
        attributes = {k: v for k, v in record.items() if k not in ("eventType", "timestamp")}
        items.append(
            Item(
                kind=EVENT,
                index=position,
                timestamp_ns=_timestamp(record, {}, label),
                name=event_type,
                service=_string_attribute(attributes, "service.name", "service"),
                host=_string_attribute(attributes, "host.name", "hostname", "host"),
                tags=_tags(attributes),
            )
        )
    return ParsedPayload(items)


Parser = Callable[[bytes, PayloadContext], ParsedPayload]

#: Route-shape name to parser.
PARSERS: Mapping[str, Parser] = {
    "metrics": parse_metrics,
    "logs": parse_logs,
    "traces": parse_traces,
    "events": parse_events,
}

_EVENTS_PATH = re.compile(r"/v1/accounts(/[^/]+)?/events")


def route_shape(path: str) -> Optional[str]:
    """
    Return the route-shape name (a key of L{PARSERS}) for a request path,
    or L{None} when the path is not a New Relic JSON route.
    """
    path = path.rstrip("/")
    if path == "/metric/v1":
        return "metrics"
    if path == "/log/v1":
        return "logs"
    if path == "/trace/v1":
        return "traces"
    if _EVENTS_PATH.fullmatch(path):
        return "events"
    return None


def parse(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a payload with the parser for C{context.path} (see
    L{route_shape}).

    @raise PayloadError: the path is not a New Relic JSON route, or the
        payload is invalid.
    """
    shape = route_shape(context.path)
    if shape is None:
        raise PayloadError("not a New Relic JSON route")
    return PARSERS[shape](body, context)
