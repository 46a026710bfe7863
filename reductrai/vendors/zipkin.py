"""
Zipkin's v2 span intake, C{/api/v2/spans}.  Success is 202.
"""

from __future__ import annotations

from reductrai.formats import zipkin as formats
from reductrai.vendors.base import TRACES, Route, Vendor, empty_success
from reductrai.vendors.common import endpoint_upstream, text_error

NAME = "zipkin"

ROUTES = (
    Route(vendor=NAME, name="spans", kind=TRACES, path="/api/v2/spans", success=empty_success(202), parser=formats.parse),
)

VENDOR = Vendor(
    name=NAME,
    routes=ROUTES,
    credential_headers=frozenset({"authorization"}),
    credential_query=frozenset(),
    error=text_error,
    upstream_base=endpoint_upstream("zipkin.endpoint"),
)
