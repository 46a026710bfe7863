"""
Secondary indexes over parsed items, and parsing of stored records.

The C{index} database maps terms to record keys::

    field (1 byte) | term (UTF-8, at most 200 bytes) | 0x00 | record key (12 bytes)  ->  b""

with fields C{s} service, C{h} host, C{m} metric name and C{t} trace id.
Because a record key starts with the arrival time, the keys of one term are
in time order, so a lookup is one cursor range.  C{index_rev} maps a record
key to the index keys written for it (joined by C{0x01} separators after a
2-byte length each), so retention removes exactly those.

Indexes are written in the transaction that stores the record, when the
ingest path passes the parsed items to L{reductrai.store.RecordStore.append}.
Records stored without items are found by scanning (see
L{reductrai.query}).
"""

from __future__ import annotations

import struct
from typing import Iterable, Iterator, Optional
from urllib.parse import parse_qs

import lmdb

from reductrai.formats.items import METRIC, SKETCH, Item, ParsedPayload, PayloadContext
from reductrai.record import KEY_SIZE, RecordHeader

INDEX_DB = b"index"
INDEX_REV_DB = b"index_rev"

SERVICE = b"s"
HOST = b"h"
METRIC_NAME = b"m"
TRACE = b"t"

MAX_TERM_BYTES = 200
_LENGTH = struct.Struct(">H")
# Item kinds whose name is indexed as a metric name.
_NAMED_KINDS = frozenset({METRIC, SKETCH})


def term_prefix(field: bytes, term: str) -> bytes:
    """
    Return the index key prefix of one term.
    """
    encoded = term.replace("\x00", " ").encode("utf-8")[:MAX_TERM_BYTES]
    return field + encoded + b"\x00"


def terms_of(items: Iterable[Item]) -> set[bytes]:
    """
    Return the index key prefixes for the items of one record.
    """
    # The distinct terms are collected first: a batch of thousands of items
    # usually names a handful of services and hosts, so each prefix is
    # encoded once rather than once per item.
    services: set[str] = set()
    hosts: set[str] = set()
    names: set[str] = set()
    traces: set[str] = set()
    for item in items:
        if item.service:
            services.add(item.service)
        if item.host:
            hosts.add(item.host)
        if item.name and item.kind in _NAMED_KINDS:
            names.add(item.name)
        if item.trace_id:
            traces.add(item.trace_id)
    prefixes = {term_prefix(SERVICE, term) for term in services}
    prefixes.update(term_prefix(HOST, term) for term in hosts)
    prefixes.update(term_prefix(METRIC_NAME, term) for term in names)
    prefixes.update(term_prefix(TRACE, term) for term in traces)
    return prefixes


def summary_of(items: list[Item]) -> dict:
    """
    Return the header fields that describe a record's items: their count
    and the range of their own timestamps.
    """
    times = [item.timestamp_ns for item in items if item.timestamp_ns is not None]
    return {
        "items": len(items),
        "item_min_ns": min(times) if times else None,
        "item_max_ns": max(times) if times else None,
    }


def index_ops(key: bytes, items: list[Item]) -> list[tuple]:
    """
    Return the store operations indexing a record's items.
    """
    keys = sorted(prefix + key for prefix in terms_of(items))
    if not keys:
        return []
    ops = [("put", INDEX_DB, index_key, b"") for index_key in keys]
    ops.append(("put", INDEX_REV_DB, key, b"".join(_LENGTH.pack(len(k)) + k for k in keys)))
    return ops


def reverse_keys(value: bytes) -> list[bytes]:
    """
    Split an C{index_rev} value into its index keys.
    """
    keys = []
    offset = 0
    while offset + 2 <= len(value):
        (length,) = _LENGTH.unpack_from(value, offset)
        keys.append(bytes(value[offset + 2 : offset + 2 + length]))
        offset += 2 + length
    return keys


def lookup(
    txn: lmdb.Transaction, db, field: bytes, term: str, from_key: bytes, to_key: Optional[bytes]
) -> Iterator[bytes]:
    """
    Yield the record keys indexed under one term, in time order, from
    C{from_key} (inclusive) to C{to_key} (exclusive, or no bound).
    """
    prefix = term_prefix(field, term)
    cursor = txn.cursor(db=db)
    if not cursor.set_range(prefix + from_key):
        return
    for index_key in cursor.iternext(keys=True, values=False):
        if not index_key.startswith(prefix) or len(index_key) != len(prefix) + KEY_SIZE:
            if not index_key.startswith(prefix):
                return
            continue
        record_key = bytes(index_key[len(prefix) :])
        if to_key is not None and record_key >= to_key:
            return
        yield record_key


def payload_context(header: RecordHeader) -> PayloadContext:
    """
    Rebuild what a parser needs to know about a stored request.
    """
    query = parse_qs(header.query or "", keep_blank_values=True)
    headers = {name.lower(): value for name, value in header.headers}
    return PayloadContext(path=header.path, content_type=header.content_type, query=query, headers=headers)


def _datadog(header: RecordHeader, body: bytes, context: PayloadContext) -> ParsedPayload:
    from reductrai.formats import datadog, datadog_agent

    route = header.route
    if route == "logs_v1_key" or header.path.startswith("/v1/input"):
        return datadog.PARSERS["logs_v1"](body, context)
    media = (header.content_type or "").split(";")[0].strip().lower()
    if route in datadog.PARSERS and not (route == "series_v2" and media == "application/x-protobuf"):
        return datadog.PARSERS[route](body, context)
    shape = datadog.ROUTES.get(header.path.rstrip("/"))
    if shape is not None and not (shape == "series_v2" and media == "application/x-protobuf"):
        return datadog.PARSERS[shape](body, context)
    return datadog_agent.parse(body, context)


def _by_module(name: str):
    def parse(header: RecordHeader, body: bytes, context: PayloadContext) -> ParsedPayload:
        import importlib

        return importlib.import_module(f"reductrai.formats.{name}").parse(body, context)

    return parse


_VENDOR_PARSERS = {
    "datadog": _datadog,
    "otlp": _by_module("otlp"),
    "opentelemetry": _by_module("otlp"),
    "prometheus": _by_module("prometheus"),
    "loki": _by_module("loki"),
    "newrelic": _by_module("newrelic"),
    "splunk": _by_module("splunk"),
    "elasticsearch": _by_module("elasticsearch"),
    "influx": _by_module("influx"),
    "influxdb": _by_module("influx"),
    "zipkin": _by_module("zipkin"),
}

# Paths that name their format whatever the vendor field says, tried in
# order when the vendor is not one of the above.
_PATH_HINTS = (
    ("/v1/traces", "otlp"), ("/v1/metrics", "otlp"), ("/v1/logs", "otlp"),
    ("/loki/api/v1/push", "loki"), ("/api/prom/push", "loki"),
    ("/services/collector", "splunk"), ("/_bulk", "elasticsearch"),
    ("/api/v2/spans", "zipkin"), ("/write", "influx"), ("/api/v2/write", "influx"),
    ("/api/v1/write", "prometheus"), ("/api/v1/push", "prometheus"),
)


def parse_record(header: RecordHeader, body: bytes) -> Optional[ParsedPayload]:
    """
    Parse a stored record's body into items with the parser of its vendor
    and route.

    @return: the items, or L{None} when no parser applies or the body does
        not parse (opaque routes, metadata, payloads the parser rejects).
    """
    context = payload_context(header)
    parser = _VENDOR_PARSERS.get(header.vendor)
    if parser is None:
        path = header.path.rstrip("/")
        for suffix, name in _PATH_HINTS:
            if path.endswith(suffix):
                parser = _VENDOR_PARSERS[name]
                break
    if parser is None:
        return None
    try:
        return parser(header, body, context)
    except Exception:
        # Any parser failure means "no items": stored records were accepted
        # before parsing existed or come from routes whose format has none.
        return None
