"""
Parsers for the Datadog HTTP intake JSON payloads.

Route shapes (keys of L{PARSERS}) and the paths they serve:

    - C{series_v1}: C{/api/v1/series}.  C{{"series": [...]}} with string
      C{type}s and C{[timestamp, value]} points.  One item per point.
    - C{distribution_points}: C{/api/v1/distribution_points}.  Points are
      C{[timestamp, [value, ...]]}.  One item per point, its value the sum
      of the point's values.
    - C{series_v2}: C{/api/v2/series}.  Integer C{type} (0 unspecified, 1
      count, 2 rate, 3 gauge), C{{"timestamp", "value"}} points and
      C{resources}.  One item per point.
    - C{check_run}: C{/api/v1/check_run}.  A JSON list of checks or one
      check object.  One item per check.
    - C{events_v1}: C{/api/v1/events}.  One event object, one item.
    - C{events_v2}: C{/api/v2/events}.  C{{"data": {"type": "event",
      "attributes": {...}}}}, one item.
    - C{logs_v2}: C{/api/v2/logs}; C{logs_v1}: C{/v1/input}.  A JSON array
      of log objects or one log object; one item per log.  C{/v1/input}
      also takes C{text/plain} bodies, one item per non-empty line.

Timestamps are normalised to integer nanoseconds: series and checks carry
seconds (datadogpy sends floats with microseconds), logs carry
milliseconds or ISO 8601 strings.  Tags (C{"key:value"} strings, or
comma-separated C{ddtags}) become the item's C{tags} mapping; a tag
without a colon maps to C{""}, and a key seen several times keeps every
value, joined with C{","} in wire order.  The C{service} comes from the
C{service:} tag (or a log's C{service} field), the C{host} from C{host},
C{host_name}, C{hostname} or a C{host} resource.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Mapping, Optional

import attrs

from reductrai.formats import json_text
from reductrai.formats.items import (
    EVENT,
    LOG,
    METRIC,
    SERVICE_CHECK,
    Item,
    ParsedPayload,
    PayloadContext,
    PayloadError,
    trace_id_from_int,
    span_id_from_int,
)

#: v2 series C{type} integers to metric type names; 0 is "unspecified".
V2_METRIC_TYPES: Mapping[int, Optional[str]] = {0: None, 1: "count", 2: "rate", 3: "gauge"}

#: v1 series C{type} strings Datadog accepts.
V1_METRIC_TYPES = frozenset({"gauge", "count", "rate", "distribution"})

#: Service check C{status} integers to status names.
CHECK_STATUSES: Mapping[int, str] = {0: "ok", 1: "warning", 2: "critical", 3: "unknown"}

_INT64_MAX = (1 << 63) - 1
_NANOSECONDS = {"s": 10**9, "ms": 10**6}



def _load_json(body: bytes) -> Any:
    """
    Decode a JSON document, rejecting C{NaN} and C{Infinity}.

    @raise PayloadError: the body is not valid JSON.
    """
    try:
        return json_text.loads(body, reject_constants=True)
    except (ValueError, RecursionError) as error:
        raise PayloadError("invalid JSON") from error


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _to_nanoseconds(value: Any, unit: str, label: str) -> int:
    """
    Convert a JSON number of C{unit} (C{"s"} or C{"ms"}) since the epoch to
    integer nanoseconds, exactly for the decimal digits the client sent.

    @raise PayloadError: C{value} is not a number or is out of range.
    """
    if not _is_number(value):
        raise PayloadError(f"{label} must be a number")
    try:
        nanoseconds = int(Decimal(repr(value)) * _NANOSECONDS[unit])
    except (InvalidOperation, ValueError, OverflowError) as error:
        raise PayloadError(f"{label} is out of range") from error
    if abs(nanoseconds) > _INT64_MAX:
        raise PayloadError(f"{label} is out of range")
    return nanoseconds


def _iso_to_nanoseconds(value: str, label: str) -> int:
    """
    Convert an ISO 8601 date-time string to nanoseconds since the epoch
    (UTC when it carries no offset).

    @raise PayloadError: the string is not an ISO 8601 date-time.
    """
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as error:
        raise PayloadError(f"{label} is not an ISO 8601 date-time") from error
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    delta = moment - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86400 + delta.seconds) * 10**9 + delta.microseconds * 1000


def _to_float(value: Any, label: str) -> float:
    """
    Return a JSON number as a float.

    @raise PayloadError: C{value} is not a finite number.
    """
    if not _is_number(value):
        raise PayloadError(f"{label} must be a number")
    try:
        return float(value)
    except OverflowError as error:
        raise PayloadError(f"{label} is out of range") from error


def _optional_string(value: Any, label: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise PayloadError(f"{label} must be a string")
    return value


def _add_tag(tags: dict[str, str], tag: str) -> None:
    key, _, value = tag.partition(":")
    if key in tags and value:
        tags[key] = f"{tags[key]},{value}" if tags[key] else value
    elif key not in tags:
        tags[key] = value


def _tags_from_list(value: Any, label: str = "tags") -> dict[str, str]:
    """
    Turn a Datadog tag list (C{["env:test", "service:x"]}) into a mapping.

    @raise PayloadError: C{value} is neither null nor a list of strings.
    """
    tags: dict[str, str] = {}
    if value is None:
        return tags
    if not isinstance(value, list):
        raise PayloadError(f"{label} must be a list of strings")
    for tag in value:
        if not isinstance(tag, str):
            raise PayloadError(f"{label} must be a list of strings")
        _add_tag(tags, tag)
    return tags


def _tags_from_string(value: str, tags: dict[str, str]) -> None:
    # L{_add_tag} is inlined because this runs for every log line of a
    # batch.  Tag values are always strings, so None means a missing key.
    for tag in value.split(","):
        tag = tag.strip()
        if tag:
            key, _, tag_value = tag.partition(":")
            known = tags.get(key)
            if known is None:
                tags[key] = tag_value
            elif tag_value:
                tags[key] = f"{known},{tag_value}" if known else tag_value


def _service_from_tags(tags: Mapping[str, str]) -> Optional[str]:
    service = tags.get("service")
    return service.split(",")[0] if service else None


def _series_list(body: bytes) -> list[Any]:
    document = _load_json(body)
    if not isinstance(document, dict) or not isinstance(document.get("series"), list):
        raise PayloadError('expected an object with a "series" list')
    return document["series"]


def _series_common(series: Any, position: int) -> tuple[str, dict[str, str]]:
    if not isinstance(series, dict):
        raise PayloadError(f"series {position} must be an object")
    name = series.get("metric")
    if not isinstance(name, str) or not name:
        raise PayloadError(f"series {position} has no metric name")
    tags = _tags_from_list(series.get("tags"), f"series {position} tags")
    device = _optional_string(series.get("device"), f"series {position} device")
    if device is not None:
        tags.setdefault("device", device)
    if not isinstance(series.get("points"), list):
        raise PayloadError(f"series {position} points must be a list")
    return name, tags


def parse_series_v1(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a C{/api/v1/series} payload: one L{METRIC} item per point.

    A series without C{type} is a gauge; C{"host": null} means no host.

    @param body: the decoded request body.
    @param context: the request's path, query and headers (unused).
    @return: the points, in series order then point order.
    @raise PayloadError: the payload or one of its series is invalid.
    """
    items: list[Item] = []
    for position, series in enumerate(_series_list(body)):
        name, tags = _series_common(series, position)
        metric_type = series.get("type", "gauge")
        if metric_type is None:
            metric_type = "gauge"
        if metric_type not in V1_METRIC_TYPES:
            raise PayloadError(f"series {position} has an unknown type")
        host = _optional_string(series.get("host"), f"series {position} host")
        for point in series["points"]:
            if not isinstance(point, list) or len(point) != 2:
                raise PayloadError(f"series {position} points must be [timestamp, value] pairs")
            items.append(
                Item(
                    kind=METRIC,
                    index=len(items),
                    timestamp_ns=_to_nanoseconds(point[0], "s", "point timestamp"),
                    name=name,
                    service=_service_from_tags(tags),
                    host=host,
                    value=_to_float(point[1], "point value"),
                    metric_type=metric_type,
                    tags=dict(tags),
                )
            )
    return ParsedPayload(items)


def parse_distribution_points(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a C{/api/v1/distribution_points} payload: one L{METRIC} item of
    type C{"distribution"} per point C{[timestamp, [value, ...]]}, whose
    value is the sum of the point's values.

    @param body: the decoded request body.
    @param context: the request's path, query and headers (unused).
    @return: the points, in series order then point order.
    @raise PayloadError: the payload or one of its series is invalid.
    """
    items: list[Item] = []
    for position, series in enumerate(_series_list(body)):
        name, tags = _series_common(series, position)
        host = _optional_string(series.get("host"), f"series {position} host")
        for point in series["points"]:
            if not isinstance(point, list) or len(point) != 2 or not isinstance(point[1], list):
                raise PayloadError(
                    f"series {position} points must be [timestamp, [value, ...]] pairs"
                )
            total = sum(_to_float(value, "point value") for value in point[1])
            items.append(
                Item(
                    kind=METRIC,
                    index=len(items),
                    timestamp_ns=_to_nanoseconds(point[0], "s", "point timestamp"),
                    name=name,
                    service=_service_from_tags(tags),
                    host=host,
                    value=total,
                    metric_type="distribution",
                    tags=dict(tags),
                )
            )
    return ParsedPayload(items)


def parse_series_v2(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a C{/api/v2/series} payload: one L{METRIC} item per point.

    The host is the name of the first resource of type C{host}; other
    resources become tags named C{resource.<type>}.  Type 0 (unspecified)
    leaves C{metric_type} as L{None}.

    @param body: the decoded request body.
    @param context: the request's path, query and headers (unused).
    @return: the points, in series order then point order.
    @raise PayloadError: the payload or one of its series is invalid.
    """
    items: list[Item] = []
    for position, series in enumerate(_series_list(body)):
        name, tags = _series_common(series, position)
        type_code = series.get("type", 0)
        if not isinstance(type_code, int) or isinstance(type_code, bool):
            raise PayloadError(f"series {position} type must be an integer")
        if type_code not in V2_METRIC_TYPES:
            raise PayloadError(f"series {position} has an unknown type")
        host = None
        resources = series.get("resources")
        if resources is not None:
            if not isinstance(resources, list):
                raise PayloadError(f"series {position} resources must be a list")
            for resource in resources:
                if not isinstance(resource, dict):
                    raise PayloadError(f"series {position} resources must be objects")
                kind = _optional_string(resource.get("type"), "resource type")
                resource_name = _optional_string(resource.get("name"), "resource name")
                if kind == "host" and host is None:
                    host = resource_name
                elif kind is not None and resource_name is not None:
                    tags.setdefault(f"resource.{kind}", resource_name)
        for point in series["points"]:
            if not isinstance(point, dict):
                raise PayloadError(f"series {position} points must be objects")
            items.append(
                Item(
                    kind=METRIC,
                    index=len(items),
                    timestamp_ns=_to_nanoseconds(point.get("timestamp"), "s", "point timestamp"),
                    name=name,
                    service=_service_from_tags(tags),
                    host=host,
                    value=_to_float(point.get("value"), "point value"),
                    metric_type=V2_METRIC_TYPES[type_code],
                    tags=dict(tags),
                )
            )
    return ParsedPayload(items)


def _objects(document: Any, label: str) -> list[dict[str, Any]]:
    """
    Return a JSON list of objects, or a single object as a one-item list.
    """
    records = document if isinstance(document, list) else [document]
    for position, record in enumerate(records):
        if not isinstance(record, dict):
            raise PayloadError(f"{label} {position} must be an object")
    return records


def parse_check_run(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a C{/api/v1/check_run} payload (a list of checks or one check):
    one L{SERVICE_CHECK} item per check, its C{level} the status name.

    @param body: the decoded request body.
    @param context: the request's path, query and headers (unused).
    @return: the checks in wire order.
    @raise PayloadError: the payload or one of its checks is invalid.
    """
    items: list[Item] = []
    for position, check in enumerate(_objects(_load_json(body), "check")):
        name = check.get("check")
        if not isinstance(name, str) or not name:
            raise PayloadError(f"check {position} has no check name")
        status = check.get("status")
        if isinstance(status, bool) or status not in CHECK_STATUSES:
            raise PayloadError(f"check {position} status must be 0, 1, 2 or 3")
        timestamp = check.get("timestamp")
        tags = _tags_from_list(check.get("tags"), f"check {position} tags")
        items.append(
            Item(
                kind=SERVICE_CHECK,
                index=position,
                timestamp_ns=None
                if timestamp is None
                else _to_nanoseconds(timestamp, "s", "check timestamp"),
                name=name,
                service=_service_from_tags(tags),
                host=_optional_string(check.get("host_name"), "check host_name"),
                level=CHECK_STATUSES[status],
                message=_optional_string(check.get("message"), "check message"),
                tags=tags,
            )
        )
    return ParsedPayload(items)


def _event_item(event: Mapping[str, Any], timestamp_ns: Optional[int], text_field: str) -> Item:
    title = _optional_string(event.get("title"), "event title")
    tags = _tags_from_list(event.get("tags"), "event tags")
    for field in ("aggregation_key", "source_type_name", "priority", "category", "integration_id"):
        value = event.get(field)
        if isinstance(value, str):
            tags.setdefault(field, value)
    level = event.get("alert_type")
    return Item(
        kind=EVENT,
        index=0,
        timestamp_ns=timestamp_ns,
        name=title,
        service=_service_from_tags(tags),
        host=_optional_string(event.get("host"), "event host"),
        level=level.lower() if isinstance(level, str) else None,
        message=_optional_string(event.get(text_field), f"event {text_field}"),
        tags=tags,
    )


def parse_events_v1(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a C{/api/v1/events} payload (one event object): one L{EVENT}
    item named by its C{title}, with C{text} as message, C{alert_type} as
    level and C{date_happened} (seconds) as time.

    @param body: the decoded request body.
    @param context: the request's path, query and headers (unused).
    @return: one item.
    @raise PayloadError: the payload is not an event object.
    """
    event = _load_json(body)
    if not isinstance(event, dict):
        raise PayloadError("expected an event object")
    if not isinstance(event.get("title"), str):
        raise PayloadError("event title is required")
    happened = event.get("date_happened")
    timestamp_ns = None if happened is None else _to_nanoseconds(happened, "s", "date_happened")
    return ParsedPayload([_event_item(event, timestamp_ns, "text")])


def parse_events_v2(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a C{/api/v2/events} payload (C{{"data": {"type": "event",
    "attributes": {...}}}}): one L{EVENT} item named by C{title}, with
    C{message} as message and C{timestamp} (ISO 8601 or seconds) as time.
    The level is the nested C{attributes.status} of alert events.

    @param body: the decoded request body.
    @param context: the request's path, query and headers (unused).
    @return: one item.
    @raise PayloadError: the payload is not a v2 event.
    """
    document = _load_json(body)
    data = document.get("data") if isinstance(document, dict) else None
    attributes = data.get("attributes") if isinstance(data, dict) else None
    if not isinstance(attributes, dict):
        raise PayloadError('expected {"data": {"attributes": {...}}}')
    timestamp = attributes.get("timestamp")
    if timestamp is None:
        timestamp_ns = None
    elif isinstance(timestamp, str):
        timestamp_ns = _iso_to_nanoseconds(timestamp, "event timestamp")
    else:
        timestamp_ns = _to_nanoseconds(timestamp, "s", "event timestamp")
    item = _event_item(attributes, timestamp_ns, "message")
    inner = attributes.get("attributes")
    status = inner.get("status") if isinstance(inner, dict) else None
    if isinstance(status, str):
        item = attrs.evolve(item, level=status.lower())
    return ParsedPayload([item])


def _flatten(prefix: str, value: Any, into: dict[str, str]) -> None:
    """
    Flatten nested JSON attributes to dotted string keys and string values
    (strings as they are, other values as compact JSON).
    """
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, into)
    elif isinstance(value, str):
        into[prefix] = value
    else:
        into[prefix] = json.dumps(value, separators=(",", ":"))


#: Log fields that become item fields rather than tags.
_LOG_RESERVED = frozenset(
    {"message", "ddtags", "ddsource", "hostname", "host", "service", "status", "timestamp", "date"}
)


def _log_timestamp(record: Mapping[str, Any]) -> Optional[int]:
    for field in ("timestamp", "date"):
        value = record.get(field)
        if value is None:
            continue
        if isinstance(value, str):
            return _iso_to_nanoseconds(value, f"log {field}")
        return _to_nanoseconds(value, "ms", f"log {field}")
    return None


def _hex_from_decimal(value: Any, width: int) -> Optional[str]:
    if isinstance(value, str) and value.isdigit() and len(value) <= 39:
        number = int(value)
        return trace_id_from_int(number) if width == 32 else span_id_from_int(number)
    return None


_MISSING = object()


#: Distinct C{ddtags} strings whose tags one batch keeps parsed.
_DDTAGS_CACHE_SIZE = 256


def _log_item(
    record: Mapping[str, Any],
    position: int,
    query_tags: Mapping[str, str],
    ddtags_cache: Optional[dict[str, dict[str, str]]] = None,
) -> Item:
    """
    Build the item of one log.

    @param ddtags_cache: maps a C{ddtags} string to the tags it gives on
        top of C{query_tags}.  The logs of one batch share it because they
        usually repeat a few C{ddtags} strings.  L{None} parses every time.
    """
    # This runs for every log line of a batch, so fields are read through
    # one bound C{get} and strings are tested with C{type() is str} first.
    # The checks keep the order of the errors a client receives: ddtags,
    # ddsource, hostname, status, service, then the timestamp.
    get = record.get
    ddtags = get("ddtags")
    if ddtags is None:
        tags = dict(query_tags) if query_tags else {}
    elif type(ddtags) is not str and not isinstance(ddtags, str):
        raise PayloadError(f"log {position} ddtags must be a string")
    elif ddtags_cache is None:
        tags = dict(query_tags) if query_tags else {}
        _tags_from_string(ddtags, tags)
    else:
        parsed = ddtags_cache.get(ddtags)
        if parsed is not None:
            tags = parsed.copy()
        else:
            tags = dict(query_tags) if query_tags else {}
            _tags_from_string(ddtags, tags)
            if len(ddtags_cache) < _DDTAGS_CACHE_SIZE:
                ddtags_cache[ddtags] = tags.copy()
    source = get("ddsource")
    if source is not None:
        if type(source) is not str and not isinstance(source, str):
            raise PayloadError(f"log {position} ddsource must be a string")
        if "source" not in tags:
            tags["source"] = source
    for key, value in record.items():
        if key in _LOG_RESERVED:
            continue
        if type(value) is str:
            tags[key] = value
        else:
            _flatten(key, value, tags)
    message = get("message")
    if message is not None and type(message) is not str and not isinstance(message, str):
        message = json.dumps(message, separators=(",", ":"))
    host = get("hostname", _MISSING)
    if host is _MISSING:
        host = get("host")
    if host is not None and type(host) is not str and not isinstance(host, str):
        raise PayloadError(f"log {position} hostname must be a string")
    status = get("status")
    if status is not None and type(status) is not str and not isinstance(status, str):
        raise PayloadError(f"log {position} status must be a string")
    service = get("service")
    if service is not None and type(service) is not str and not isinstance(service, str):
        raise PayloadError(f"log {position} service must be a string")
    timestamp_ns = _log_timestamp(record)
    trace_id = get("dd.trace_id")
    span_id = get("dd.span_id")
    return Item(
        kind=LOG,
        index=position,
        timestamp_ns=timestamp_ns,
        service=service or _service_from_tags(tags),
        host=host,
        level=status.lower() if status else None,
        trace_id=None if trace_id is None else _hex_from_decimal(trace_id, 32),
        span_id=None if span_id is None else _hex_from_decimal(span_id, 16),
        message=message,
        tags=tags,
    )


def _query_tags(context: PayloadContext) -> dict[str, str]:
    tags: dict[str, str] = {}
    for value in context.query.get("ddtags", []):
        _tags_from_string(value, tags)
    return tags


def parse_logs_v2(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a C{/api/v2/logs} payload (an array of log objects, or one):
    one L{LOG} item per log.

    The item's C{level} is the lower-cased C{status},
    C{host} the C{hostname}.  Tags are the C{ddtags} query parameter, then
    the log's C{ddtags}, C{source} and every other attribute flattened to
    dotted keys.  C{dd.trace_id}/C{dd.span_id} (decimal) give the trace
    and span ids.

    @param body: the decoded request body.
    @param context: the request; its C{ddtags} query parameter applies to
        every log.
    @return: the logs in wire order.
    @raise PayloadError: the payload or one of its logs is invalid.
    """
    query_tags = _query_tags(context)
    records = _objects(_load_json(body), "log")
    cache: dict[str, dict[str, str]] = {}
    return ParsedPayload([_log_item(record, position, query_tags, cache) for position, record in enumerate(records)])


def parse_logs_v1(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a C{/v1/input} payload.  JSON bodies have the C{/api/v2/logs}
    shape (see L{parse_logs_v2}); a C{text/plain} body gives one L{LOG}
    item per non-empty line, with the C{ddtags}, C{ddsource},
    C{hostname} and C{service} query parameters applied.

    @param body: the decoded request body.
    @param context: the request's content type and query parameters.
    @return: the logs in wire order.
    @raise PayloadError: the payload is invalid.
    """
    content_type = (context.content_type or "").split(";")[0].strip().lower()
    if content_type != "text/plain":
        return parse_logs_v2(body, context)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PayloadError("body is not UTF-8") from error
    defaults: dict[str, Any] = {}
    for field in ("ddsource", "hostname", "service"):
        values = context.query.get(field)
        if values:
            defaults[field] = values[-1]
    query_tags = _query_tags(context)
    lines = [line for line in text.splitlines() if line.strip()]
    return ParsedPayload(
        [
            _log_item({**defaults, "message": line}, position, query_tags)
            for position, line in enumerate(lines)
        ]
    )


Parser = Callable[[bytes, PayloadContext], ParsedPayload]

#: Route-shape name to parser.
PARSERS: Mapping[str, Parser] = {
    "series_v1": parse_series_v1,
    "series_v2": parse_series_v2,
    "distribution_points": parse_distribution_points,
    "check_run": parse_check_run,
    "events_v1": parse_events_v1,
    "events_v2": parse_events_v2,
    "logs_v2": parse_logs_v2,
    "logs_v1": parse_logs_v1,
}

#: Request path to route-shape name.
ROUTES: Mapping[str, str] = {
    "/api/v1/series": "series_v1",
    "/api/v2/series": "series_v2",
    "/api/v1/distribution_points": "distribution_points",
    "/api/v1/check_run": "check_run",
    "/api/v1/events": "events_v1",
    "/api/v2/events": "events_v2",
    "/api/v2/logs": "logs_v2",
    "/v1/input": "logs_v1",
}


def parse(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a payload with the parser of the route named by C{context.path}
    (see L{ROUTES}; a trailing slash is ignored).

    @raise PayloadError: the path is not a Datadog JSON route, or the
        payload is invalid.
    """
    shape = ROUTES.get(context.path.rstrip("/") or "/")
    if shape is None:
        raise PayloadError("not a Datadog JSON route")
    return PARSERS[shape](body, context)
