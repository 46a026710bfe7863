"""
Datadog Agent and tracer payloads parsed into items.

The path chooses the format:

  - C{/api/v2/series} with C{Content-Type: application/x-protobuf}: the
    Agent's C{MetricPayload}.  One item is one point: for each series in
    wire order, each of its points (C{metric} items).
  - C{/api/beta/sketches}: the Agent's C{SketchPayload}.  One item is one
    sketch entry: for each sketch in wire order, its (deprecated)
    C{distributions}, then its C{dogsketches} (C{sketch} items, valued by
    their sum).
  - C{/api/v0.2/traces}: the trace agent's C{AgentPayload}.  One item is one
    span: tracer payloads, then chunks, then spans, in wire order.
  - C{/v0.3/traces}, C{/v0.4/traces}: a tracer's msgpack (or JSON, with
    C{Content-Type: application/json}) array of traces, each an array of span
    maps.  One item is one span: traces, then spans, in wire order.
  - C{/v0.5/traces}: a tracer's msgpack C{[string table, traces]}, where each
    span is a 12-element array whose strings are string-table indices.  One
    item is one span, in the same order.

Tags in C{key:value} form become C{tags[key] = value} (a tag without a colon
maps to the empty string; values of a repeated key are joined with commas).
Span items take C{error != 0} as level C{"error"}; the trace id joins the
64-bit C{trace_id} with the high 64 bits from the C{_dd.p.tid} meta tag.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Optional

import msgpack
from google.protobuf.message import DecodeError, Message

from reductrai.formats import json_text
from reductrai.formats.items import (
    METRIC,
    SKETCH,
    SPAN,
    Item,
    ParsedPayload,
    PayloadContext,
    PayloadError,
    span_id_from_int,
    trace_id_from_int,
)
from reductrai.proto import datadog_metrics_pb2, datadog_trace_pb2

SERIES_PATH = "/api/v2/series"
SKETCHES_PATH = "/api/beta/sketches"
AGENT_TRACES_PATH = "/api/v0.2/traces"
TRACER_V04_PATHS = ("/v0.3/traces", "/v0.4/traces")
TRACER_V05_PATH = "/v0.5/traces"

#: The meta tag holding the high 64 bits of a 128-bit trace id, in hex.
TRACE_ID_HIGH_TAG = "_dd.p.tid"
#: The metrics key where tracers put the trace's sampling priority.
SAMPLING_PRIORITY_KEY = "_sampling_priority_v1"
#: The trace agent's "no priority" value.
PRIORITY_NONE = -128

_NANOSECONDS_PER_SECOND = 1_000_000_000
_UINT64_MASK = (1 << 64) - 1

_METRIC_TYPES = {
    datadog_metrics_pb2.MetricPayload.COUNT: "count",
    datadog_metrics_pb2.MetricPayload.RATE: "rate",
    datadog_metrics_pb2.MetricPayload.GAUGE: "gauge",
}

#: Field order of a v0.5 span array.
_V05_FIELDS = (
    "service",
    "name",
    "resource",
    "trace_id",
    "span_id",
    "parent_id",
    "start",
    "duration",
    "error",
    "meta",
    "metrics",
    "type",
)


def _media_type(content_type: Optional[str]) -> str:
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def parse(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a Datadog Agent or tracer payload, choosing the format by path.

    @param body: the decoded body (its C{Content-Encoding} undone).
    @param context: the request; C{path} selects the format (see the module
        docstring) and C{content_type} JSON or msgpack for tracer payloads.
    @return: the points, sketches or spans as items.
    @raise PayloadError: unknown path, a JSON body on C{/api/v2/series}, or
        a body that is not a valid payload of its format.
    """
    path = context.path.rstrip("/")
    if path == SERIES_PATH:
        if _media_type(context.content_type) not in ("", "application/x-protobuf"):
            raise PayloadError("expected a protobuf MetricPayload")
        return parse_metric_payload(body)
    if path == SKETCHES_PATH:
        return parse_sketch_payload(body)
    if path == AGENT_TRACES_PATH:
        return parse_agent_payload(body)
    if path in TRACER_V04_PATHS:
        if _media_type(context.content_type) == "application/json":
            return parse_tracer_v04(_load_json(body))
        return parse_tracer_v04(_unpack_msgpack(body))
    if path == TRACER_V05_PATH:
        return parse_tracer_v05(_unpack_msgpack(body))
    raise PayloadError("unknown Datadog agent payload path")


def parse_tags(tags: Iterable[str]) -> dict[str, str]:
    """
    Turn Datadog C{key:value} tags into a mapping.

    @param tags: the tags; the first colon separates key and value.
    @return: each key with its value.  A tag without a colon maps to the
        empty string.  The values of a repeated key are joined with commas,
        in order.
    """
    parsed: dict[str, str] = {}
    for tag in tags:
        key, _, value = tag.partition(":")
        if key in parsed and parsed[key] != value:
            parsed[key] = f"{parsed[key]},{value}"
        else:
            parsed[key] = value
    return parsed


def _decode(body: bytes, message: Message, message_name: str) -> Any:
    try:
        message.ParseFromString(body)
    except (DecodeError, RecursionError, ValueError):
        raise PayloadError(f"invalid {message_name} protobuf payload") from None
    return message


def parse_metric_payload(body: bytes) -> ParsedPayload:
    """
    Parse the Agent's protobuf C{MetricPayload} (C{/api/v2/series}).

    @param body: the protobuf bytes.
    @return: one C{metric} item per point, series by series.
    @raise PayloadError: the bytes are not a C{MetricPayload}.
    """
    payload = _decode(body, datadog_metrics_pb2.MetricPayload(), "MetricPayload")
    items: list[Item] = []
    for series in payload.series:
        tags = parse_tags(series.tags)
        host = None
        for resource in series.resources:
            if resource.type == "host":
                host = resource.name or None
            else:
                tags.setdefault(resource.type, resource.name)
        for point in series.points:
            items.append(
                Item(
                    kind=METRIC,
                    index=len(items),
                    timestamp_ns=point.timestamp * _NANOSECONDS_PER_SECOND,
                    name=series.metric,
                    service=tags.get("service") or None,
                    host=host,
                    value=point.value,
                    metric_type=_METRIC_TYPES.get(series.type),
                    tags=tags,
                )
            )
    return ParsedPayload(items=items)


def parse_sketch_payload(body: bytes) -> ParsedPayload:
    """
    Parse the Agent's protobuf C{SketchPayload} (C{/api/beta/sketches}).

    @param body: the protobuf bytes.
    @return: one C{sketch} item per distribution and dogsketch entry, sketch
        by sketch, valued by the entry's sum, C{metric_type}
        C{"distribution"}.
    @raise PayloadError: the bytes are not a C{SketchPayload}.
    """
    payload = _decode(body, datadog_metrics_pb2.SketchPayload(), "SketchPayload")
    items: list[Item] = []
    for sketch in payload.sketches:
        tags = parse_tags(sketch.tags)
        for entry in list(sketch.distributions) + list(sketch.dogsketches):
            items.append(
                Item(
                    kind=SKETCH,
                    index=len(items),
                    timestamp_ns=entry.ts * _NANOSECONDS_PER_SECOND,
                    name=sketch.metric,
                    service=tags.get("service") or None,
                    host=sketch.host or None,
                    value=entry.sum,
                    metric_type="distribution",
                    tags=tags,
                )
            )
    return ParsedPayload(items=items)


def _trace_id(low: int, meta: Mapping[str, str]) -> str:
    high_hex = meta.get(TRACE_ID_HIGH_TAG, "")
    high = 0
    if len(high_hex) == 16:
        try:
            high = int(high_hex, 16)
        except ValueError:
            high = 0
    return trace_id_from_int((high << 64) | (low & _UINT64_MASK))


def _span_item(
    index: int,
    span: Mapping[str, Any],
    base_tags: Mapping[str, str],
    host: Optional[str],
    priority: Optional[int],
) -> Item:
    """
    Build a span item from a normalised span mapping (the field names of
    the Agent's C{Span} message in tracer spelling: C{trace_id}, C{meta},
    ...).
    """
    meta: Mapping[str, str] = span["meta"]
    metrics: Mapping[str, float] = span["metrics"]

    tags = dict(base_tags)
    tags.update({key: repr(value) for key, value in metrics.items()})
    tags.update(meta)
    if span["resource"]:
        tags["resource"] = span["resource"]
    if span["type"]:
        tags["type"] = span["type"]
    if priority is None and SAMPLING_PRIORITY_KEY in metrics:
        value = metrics[SAMPLING_PRIORITY_KEY]
        if math.isfinite(value):
            priority = int(value)

    parent = span["parent_id"] & _UINT64_MASK
    return Item(
        kind=SPAN,
        index=index,
        timestamp_ns=span["start"] or None,
        name=span["name"] or None,
        service=span["service"] or None,
        host=host or meta.get("_dd.hostname") or None,
        level="error" if span["error"] else None,
        trace_id=_trace_id(span["trace_id"], meta),
        span_id=span_id_from_int(span["span_id"]),
        parent_id=span_id_from_int(parent) if parent else None,
        sampling_priority=priority,
        tags=tags,
    )


def parse_agent_payload(body: bytes) -> ParsedPayload:
    """
    Parse the trace agent's protobuf C{AgentPayload} (C{/api/v0.2/traces}).

    @param body: the protobuf bytes.
    @return: one C{span} item per span.  C{host} is the tracer payload's
        hostname, else the agent's; C{sampling_priority} is the chunk's
        priority (L{None} for the agent's "none" value -128); C{tags} hold
        the agent, tracer payload and chunk tags, C{env}, the span's
        metrics and meta, C{resource} and C{type}, later ones winning.
    @raise PayloadError: the bytes are not an C{AgentPayload}.
    """
    payload = _decode(body, datadog_trace_pb2.AgentPayload(), "AgentPayload")
    items: list[Item] = []
    for tracer in payload.tracerPayloads:
        host = tracer.hostname or payload.hostName or None
        tracer_tags = dict(payload.tags)
        tracer_tags.update(tracer.tags)
        env = tracer.env or payload.env
        if env:
            tracer_tags["env"] = env
        for chunk in tracer.chunks:
            chunk_tags = dict(tracer_tags)
            chunk_tags.update(chunk.tags)
            priority = chunk.priority if chunk.priority != PRIORITY_NONE else None
            for span in chunk.spans:
                fields = {
                    "service": span.service,
                    "name": span.name,
                    "resource": span.resource,
                    "trace_id": span.traceID,
                    "span_id": span.spanID,
                    "parent_id": span.parentID,
                    "start": span.start,
                    "error": span.error,
                    "meta": dict(span.meta),
                    "metrics": dict(span.metrics),
                    "type": span.type,
                }
                items.append(_span_item(len(items), fields, chunk_tags, host, priority))
    return ParsedPayload(items=items)


def _load_json(body: bytes) -> Any:
    try:
        return json_text.loads(body)
    except (ValueError, RecursionError):
        raise PayloadError("invalid JSON") from None


def _unpack_msgpack(body: bytes) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False, unicode_errors="replace")
    except Exception:
        # msgpack signals bad input with many types (ExtraData, FormatError,
        # StackError, ValueError, TypeError for unhashable keys, ...).
        raise PayloadError("invalid msgpack payload") from None


def _text(value: Any, field: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise PayloadError(f"span {field} must be a string")


def _integer(value: Any, field: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    raise PayloadError(f"span {field} must be an integer")


def _number(value: Any, field: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise PayloadError(f"span {field} values must be numbers")


def _normalise_span(
    raw: Mapping[Any, Any],
    text: Callable[[Any, str], str],
) -> dict[str, Any]:
    """
    Check a tracer span's field types and return the span mapping that
    L{_span_item} reads.

    @param raw: the span, keyed by field name.
    @param text: reads a string field (directly, or through a string table).
    @raise PayloadError: a field has the wrong type.
    """
    meta = raw.get("meta") or {}
    metrics = raw.get("metrics") or {}
    if not isinstance(meta, dict) or not isinstance(metrics, dict):
        raise PayloadError("span meta and metrics must be maps")
    return {
        "service": text(raw.get("service"), "service"),
        "name": text(raw.get("name"), "name"),
        "resource": text(raw.get("resource"), "resource"),
        "trace_id": _integer(raw.get("trace_id"), "trace_id"),
        "span_id": _integer(raw.get("span_id"), "span_id"),
        "parent_id": _integer(raw.get("parent_id"), "parent_id"),
        "start": _integer(raw.get("start"), "start"),
        "error": _integer(raw.get("error"), "error"),
        "meta": {text(key, "meta"): text(value, "meta") for key, value in meta.items()},
        "metrics": {text(key, "metrics"): _number(value, "metrics") for key, value in metrics.items()},
        "type": text(raw.get("type"), "type"),
    }


def _traces(document: Any) -> list[list[Any]]:
    if not isinstance(document, list) or not all(isinstance(trace, list) for trace in document):
        raise PayloadError("tracer payload must be an array of traces")
    return document


def parse_tracer_v04(document: Any) -> ParsedPayload:
    """
    Read a decoded v0.3/v0.4 tracer payload: an array of traces, each an
    array of span maps.

    @param document: the msgpack- or JSON-decoded body.
    @return: one C{span} item per span; C{sampling_priority} from the
        span's C{_sampling_priority_v1} metric.
    @raise PayloadError: the structure or a field type is wrong.
    """
    items: list[Item] = []
    for trace in _traces(document):
        for raw in trace:
            if not isinstance(raw, dict):
                raise PayloadError("span must be a map")
            span = _normalise_span(raw, _text)
            items.append(_span_item(len(items), span, {}, None, None))
    return ParsedPayload(items=items)


def parse_tracer_v05(document: Any) -> ParsedPayload:
    """
    Read a decoded v0.5 tracer payload: C{[string table, traces]}, each span
    a 12-element array (service, name, resource, trace_id, span_id,
    parent_id, start, duration, error, meta, metrics, type) whose strings
    are indices into the string table.

    @param document: the msgpack-decoded body.
    @return: one C{span} item per span.
    @raise PayloadError: the structure, a field type or a string index is
        wrong.
    """
    if not isinstance(document, list) or len(document) != 2:
        raise PayloadError("v0.5 payload must be [string table, traces]")
    table, traces = document
    if not isinstance(table, list) or not all(isinstance(entry, str) for entry in table):
        raise PayloadError("v0.5 string table must be an array of strings")

    def lookup(value: Any, field: str) -> str:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(table):
            return table[value]
        raise PayloadError(f"v0.5 span {field} must be a string table index")

    items: list[Item] = []
    for trace in _traces(traces):
        for raw in trace:
            if not isinstance(raw, list) or len(raw) != len(_V05_FIELDS):
                raise PayloadError("v0.5 span must be an array of 12 fields")
            span = _normalise_span(dict(zip(_V05_FIELDS, raw)), lookup)
            items.append(_span_item(len(items), span, {}, None, None))
    return ParsedPayload(items=items)
