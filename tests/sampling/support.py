"""
Shared helpers for the sampling tests: parse a captured corpus request
with the parser its path selects.
"""

from __future__ import annotations

from typing import Callable, Optional
from urllib.parse import parse_qs

import attrs

from reductrai.encoding import decode_body
from reductrai.formats import datadog, datadog_agent, elasticsearch, loki, newrelic, otlp, prometheus, splunk, zipkin
from reductrai.formats.items import ParsedPayload, PayloadContext

from tests.corpus import CapturedRequest

MAX_DECODED = 64 * 1024 * 1024


@attrs.frozen
class Prepared:
    vendor: str
    route_kind: str
    route_name: str
    context: PayloadContext
    decoded: bytes
    parsed: ParsedPayload
    parser: Callable[[bytes, PayloadContext], ParsedPayload]


def parser_for(vendor: str, path: str) -> tuple[str, str, Callable[[bytes, PayloadContext], ParsedPayload]]:
    """
    Return (route kind, route name, parser) for a request path of a vendor.
    """
    if path.endswith(("/v1/traces", "/v1/logs", "/v1/metrics")):
        signal = otlp.signal_for_path(path)
        return {"traces": "traces", "logs": "logs", "metrics": "metrics"}[signal], signal, otlp.parse
    if vendor == "datadog":
        if path in datadog.ROUTES:
            shape = datadog.ROUTES[path]
            kind = "logs" if shape.startswith("logs") else "metrics"
            return kind, shape, datadog.parse
        return "traces", "traces", datadog_agent.parse
    if vendor == "newrelic":
        shape = newrelic.route_shape(path)
        return {"logs": "logs", "traces": "traces"}.get(shape, "metrics"), shape, newrelic.parse
    if vendor == "splunk":
        return "logs", splunk.ROUTES[path], splunk.parse
    if vendor == "loki":
        return "logs", "push", loki.parse
    if vendor == "elasticsearch":
        return "logs", "bulk", elasticsearch.parse
    if vendor == "zipkin":
        return "traces", "spans", zipkin.parse
    if vendor == "prometheus":
        return "metrics", "remote_write", prometheus.parse
    raise KeyError(vendor)


_FOLDER_VENDORS = {
    "datadog": "datadog",
    "opentelemetry": "otlp",
    "newrelic": "newrelic",
    "splunk": "splunk",
    "python-logging-loki": "loki",
    "elasticsearch": "elasticsearch",
    "prometheus": "prometheus",
}


def vendor_of(folder: str) -> str:
    for prefix, vendor in _FOLDER_VENDORS.items():
        if folder.startswith(prefix):
            return vendor
    raise KeyError(folder)


def prepare(request: CapturedRequest) -> Prepared:
    """
    Decode and parse a captured request the way the daemon does.
    """
    vendor = vendor_of(request.folder)
    headers = {name.lower(): value for name, value in request.headers}
    context = PayloadContext(
        path=request.path,
        content_type=request.meta.get("content_type"),
        query=parse_qs(request.meta.get("query") or "", keep_blank_values=True),
        headers=headers,
    )
    decoded = decode_body(request.body, request.meta.get("content_encoding"), MAX_DECODED)
    kind, name, parser = parser_for(vendor, request.path)
    return Prepared(vendor, kind, name, context, decoded, parser(decoded, context), parser)


def make_context(path: str, content_type: Optional[str] = None, headers: Optional[dict] = None) -> PayloadContext:
    return PayloadContext(path=path, content_type=content_type, headers=headers or {})
