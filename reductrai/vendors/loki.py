"""
Grafana Loki's push API: C{/loki/api/v1/push} (snappy protobuf or JSON)
and the legacy C{/api/prom/push} JSON.  Success is 204.
"""

from __future__ import annotations

from reductrai.formats import loki as formats
from reductrai.vendors.base import LOGS, Route, Vendor, empty_success
from reductrai.vendors.common import endpoint_upstream, text_error

NAME = "loki"

ROUTES = (
    Route(vendor=NAME, name="push", kind=LOGS, path="/loki/api/v1/push", success=empty_success(204), parser=formats.parse),
    # Cortex uses the same path for remote write protobuf; JSON bodies there
    # are Loki's legacy push.
    Route(
        vendor=NAME, name="push_legacy", kind=LOGS, path="/api/prom/push", success=empty_success(204),
        parser=formats.parse, content_types=("application/json",),
    ),
)

VENDOR = Vendor(
    name=NAME,
    routes=ROUTES,
    credential_headers=frozenset({"authorization"}),
    credential_query=frozenset(),
    error=text_error,
    upstream_base=endpoint_upstream("loki.endpoint"),
)
