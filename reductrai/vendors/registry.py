"""
The vendors this build knows, in lookup order, and the fallback for
requests no vendor claims.
"""

from __future__ import annotations

from typing import Mapping, Optional

from reductrai.vendors import datadog, elasticsearch, influxdb, loki, newrelic, otlp, prometheus, splunk, zipkin
from reductrai.vendors.base import OPAQUE, Match, Route, Router, Vendor, fixed_success, json_answer

# Loki comes before Prometheus so that its JSON route on the shared
# /api/prom/push path is tried first; Prometheus takes the protobuf bodies.
VENDORS: tuple[Vendor, ...] = (
    datadog.VENDOR,
    newrelic.VENDOR,
    otlp.VENDOR,
    loki.VENDOR,
    prometheus.VENDOR,
    splunk.VENDOR,
    elasticsearch.VENDOR,
    influxdb.VENDOR,
    zipkin.VENDOR,
)


def _forward_to(upstream: str, settings: Mapping[str, object]) -> Optional[str]:
    forward_to = settings.get("proxy.forward_to")
    return str(forward_to) if forward_to else None


#: Requests on paths no vendor claims are stored as opaque records and
#: forwarded to C{proxy.forward_to} when it is set, never rejected.
UNKNOWN = Vendor(
    name="unknown",
    routes=(),
    credential_headers=frozenset({"authorization", "api-key", "x-api-key", "dd-api-key"}),
    credential_query=frozenset({"api_key", "apikey", "token", "key"}),
    error=lambda status, reason, context=None: json_answer(status, {"error": reason}),
    upstream_base=_forward_to,
)

UNKNOWN_MATCH = Match(
    Route(
        vendor="unknown", name="other", kind=OPAQUE, path="/", success=fixed_success(200, {}), prefix=True,
        methods=frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"}),
    ),
    UNKNOWN,
)


def default_router() -> Router:
    """
    Return a router over every known vendor's routes.
    """
    return Router(VENDORS)
