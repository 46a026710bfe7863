"""
The vendor-neutral item model that every payload parser produces.

An item is one unit of telemetry inside a request: one metric point (or one
series when the format carries no per-point structure), one log line, one
span, one event, one service check.  Sampling, indexing and the query API
work on items, never on vendor payloads.
"""

from __future__ import annotations

from typing import Mapping, Optional

import attrs

#: Item kinds.  A route's kind (see L{reductrai.vendors}) names the kind of
#: the items its payloads usually hold, but a parser sets each item's own.
METRIC = "metric"
SKETCH = "sketch"
LOG = "log"
SPAN = "span"
EVENT = "event"
SERVICE_CHECK = "service_check"
METADATA = "metadata"

ITEM_KINDS = frozenset({METRIC, SKETCH, LOG, SPAN, EVENT, SERVICE_CHECK, METADATA})


class PayloadError(ValueError):
    """
    The payload is invalid as a whole (bad JSON, truncated protobuf, wrong
    top-level type).  The proxy answers the vendor's 400 with C{reason}.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.define
class Item:
    """
    One unit of telemetry extracted from a payload.

    Items are values: a parser builds them and nothing changes them
    afterwards (L{attrs.evolve} makes a changed copy).  The class is not
    frozen only because a frozen slotted class costs more than twice as much
    to build (attrs then sets each field through C{object.__setattr__}), and
    a batch of logs or points builds thousands.

    @ivar kind: one of L{ITEM_KINDS}.
    @ivar index: the item's position among the payload's items, in wire
        order, starting at 0; payload rewriting uses it to drop items.
    @ivar timestamp_ns: the item's own time in nanoseconds since the epoch,
        or L{None} when the payload carries none.
    @ivar name: metric name, span name, event title or service check name.
    @ivar service: the service the item belongs to, from the vendor's own
        field (Datadog C{service} tag, OTLP C{service.name}, ...).
    @ivar host: the host the item belongs to.
    @ivar level: the log level or status, lower-cased (C{"error"},
        C{"warn"}, C{"info"}, ...); for spans the status (C{"error"} or
        L{None}); for service checks the status name (C{"ok"},
        C{"warning"}, C{"critical"}, C{"unknown"}).
    @ivar trace_id: the trace id as 32 lower-case hex digits (128 bits,
        zero-padded on the left when the vendor uses 64-bit ids), or L{None}.
    @ivar span_id: the span id as 16 lower-case hex digits, or L{None}.
    @ivar parent_id: the parent span id as 16 lower-case hex digits, or
        L{None}.
    @ivar message: a log line's text or an event's text.
    @ivar value: a metric point's value (the sum for distributions).
    @ivar metric_type: C{"gauge"}, C{"count"}, C{"rate"}, C{"histogram"},
        C{"distribution"}, C{"summary"}, ... for metric items.
    @ivar sampling_priority: the trace's sampling priority where the
        format carries one (Datadog: 2 user keep, -1 user reject).
    @ivar tags: other attributes, labels and tags, flattened to strings.
    """

    kind: str
    index: int
    timestamp_ns: Optional[int] = None
    name: Optional[str] = None
    service: Optional[str] = None
    host: Optional[str] = None
    level: Optional[str] = None
    trace_id: Optional[str] = None
    span_id: Optional[str] = None
    parent_id: Optional[str] = None
    message: Optional[str] = None
    value: Optional[float] = None
    metric_type: Optional[str] = None
    sampling_priority: Optional[int] = None
    tags: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class ParsedPayload:
    """
    The items of one request.

    @ivar items: every accepted item, in wire order.
    @ivar rejected: how many items were invalid and left out (formats
        with partial success, such as OTLP and Elasticsearch bulk).
    @ivar errors: one reason per rejected item, in wire order, for the
        vendor's partial-success answer.
    """

    items: list[Item]
    rejected: int = 0
    errors: list[str] = attrs.field(factory=list)


def trace_id_from_int(value: int) -> str:
    """
    Format an integer trace id (64 or 128 bits) as 32 lower-case hex digits.
    """
    return format(value & ((1 << 128) - 1), "032x")


def span_id_from_int(value: int) -> str:
    """
    Format an integer span id as 16 lower-case hex digits.
    """
    return format(value & ((1 << 64) - 1), "016x")


def trace_id_from_bytes(value: bytes) -> Optional[str]:
    """
    Format a binary trace id (OTLP: 16 bytes) as 32 lower-case hex digits,
    or return L{None} for an empty or all-zero id.
    """
    if not value or not any(value):
        return None
    return value.hex().rjust(32, "0")


def span_id_from_bytes(value: bytes) -> Optional[str]:
    """
    Format a binary span id (OTLP: 8 bytes) as 16 lower-case hex digits,
    or return L{None} for an empty or all-zero id.
    """
    if not value or not any(value):
        return None
    return value.hex().rjust(16, "0")


@attrs.frozen
class PayloadContext:
    """
    What a parser may know about the request besides its body.

    @ivar path: the request path, without the query string.
    @ivar content_type: the C{Content-Type} header value, or L{None}.
    @ivar query: the query parameters, each name with its values in order.
    @ivar headers: request headers by lower-case name (the last value when
        a header is repeated), with credentials already removed.
    """

    path: str
    content_type: Optional[str] = None
    query: Mapping[str, list[str]] = attrs.field(factory=dict)
    headers: Mapping[str, str] = attrs.field(factory=dict)
