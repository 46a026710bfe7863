"""
Parser for Zipkin JSON v2 spans, served on C{/api/v2/spans} (and by New
Relic's C{/trace/v1} with C{Data-Format: zipkin}).

The payload is a JSON list of span objects.  One item is one span:

    - C{trace_id}: C{traceId} (16 or 32 hex digits) as 32 lower-case hex
      digits, zero-padded on the left for 64-bit ids;
    - C{span_id} / C{parent_id}: C{id} / C{parentId} (1 to 16 hex digits)
      as 16 lower-case hex digits;
    - C{name}: the span C{name};
    - C{service}: C{localEndpoint.serviceName};
    - C{timestamp_ns}: C{timestamp} (microseconds) times 1000;
    - C{level}: C{"error"} when the span has an C{error} tag (Zipkin's
      convention: the tag's presence marks the error, whatever its value),
      else L{None};
    - C{tags}: the span's C{tags}, plus C{span.kind} (lower-cased
      C{kind}), C{duration_us}, C{local.ipv4}/C{local.ipv6}/C{local.port},
      C{remote.service}/C{remote.ipv4}/C{remote.ipv6}/C{remote.port} when
      present.

Zipkin rejects the whole request when one span is invalid, and so does
this parser.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from reductrai.formats import json_text
from reductrai.formats.items import SPAN, Item, ParsedPayload, PayloadContext, PayloadError

_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_INT64_MAX = (1 << 63) - 1



def _is_hex(value: str, max_length: int) -> bool:
    return 0 < len(value) <= max_length and all(character in _HEX_DIGITS for character in value)


def _trace_id(value: Any, position: int) -> str:
    if not isinstance(value, str) or len(value) not in (16, 32) or not _is_hex(value, 32):
        raise PayloadError(f"span {position} traceId must be 16 or 32 hex digits")
    return value.lower().rjust(32, "0")


def _span_id(value: Any, position: int, field: str) -> str:
    if not isinstance(value, str) or not _is_hex(value, 16):
        raise PayloadError(f"span {position} {field} must be 1 to 16 hex digits")
    return value.lower().rjust(16, "0")


def _integer(value: Any, position: int, field: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT64_MAX // 1000:
        raise PayloadError(f"span {position} {field} must be a non-negative integer")
    return value


def _endpoint(span: Mapping[str, Any], field: str, position: int) -> Mapping[str, Any]:
    endpoint = span.get(field)
    if endpoint is None:
        return {}
    if not isinstance(endpoint, dict):
        raise PayloadError(f"span {position} {field} must be an object")
    return endpoint


def _endpoint_tags(endpoint: Mapping[str, Any], prefix: str, tags: dict[str, str]) -> None:
    for field in ("ipv4", "ipv6"):
        value = endpoint.get(field)
        if isinstance(value, str):
            tags[f"{prefix}.{field}"] = value
    port = endpoint.get("port")
    if isinstance(port, int) and not isinstance(port, bool):
        tags[f"{prefix}.port"] = str(port)


def _span_item(span: Any, position: int) -> Item:
    if not isinstance(span, dict):
        raise PayloadError(f"span {position} must be an object")
    trace_id = _trace_id(span.get("traceId"), position)
    span_id = _span_id(span.get("id"), position, "id")
    parent = span.get("parentId")
    parent_id = None if parent is None else _span_id(parent, position, "parentId")
    name = span.get("name")
    if name is not None and not isinstance(name, str):
        raise PayloadError(f"span {position} name must be a string")
    timestamp = _integer(span.get("timestamp"), position, "timestamp")
    duration = _integer(span.get("duration"), position, "duration")
    raw_tags = span.get("tags") or {}
    if not isinstance(raw_tags, dict) or not all(isinstance(v, str) for v in raw_tags.values()):
        raise PayloadError(f"span {position} tags must map strings to strings")
    tags: dict[str, str] = dict(raw_tags)
    kind = span.get("kind")
    if kind is not None:
        if not isinstance(kind, str):
            raise PayloadError(f"span {position} kind must be a string")
        tags["span.kind"] = kind.lower()
    if duration is not None:
        tags["duration_us"] = str(duration)
    local = _endpoint(span, "localEndpoint", position)
    remote = _endpoint(span, "remoteEndpoint", position)
    service = local.get("serviceName")
    if service is not None and not isinstance(service, str):
        raise PayloadError(f"span {position} localEndpoint.serviceName must be a string")
    _endpoint_tags(local, "local", tags)
    _endpoint_tags(remote, "remote", tags)
    remote_service = remote.get("serviceName")
    if isinstance(remote_service, str):
        tags["remote.service"] = remote_service
    return Item(
        kind=SPAN,
        index=position,
        timestamp_ns=None if timestamp is None else timestamp * 1000,
        name=name,
        service=service,
        level="error" if "error" in raw_tags else None,
        trace_id=trace_id,
        span_id=span_id,
        parent_id=parent_id,
        tags=tags,
    )


def parse(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a Zipkin JSON v2 span list: one L{SPAN} item per span, in wire
    order (see the module docstring for the fields).

    @param body: the decoded request body.
    @param context: the request's path, query and headers (unused).
    @return: the spans.
    @raise PayloadError: the body is not a JSON list of valid spans.
    """
    try:
        document = json_text.loads(body, reject_constants=True)
    except (ValueError, RecursionError) as error:
        raise PayloadError("invalid JSON") from error
    if not isinstance(document, list):
        raise PayloadError("expected a JSON list of spans")
    return ParsedPayload([_span_item(span, position) for position, span in enumerate(document)])
