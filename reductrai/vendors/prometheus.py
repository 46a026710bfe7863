"""
Prometheus remote write 1.0 and 2.0 (C{/api/v1/write}, Cortex's
C{/api/prom/push}, Mimir's C{/prometheus/api/v1/write}).

Success is 204.  A remote write 2.0 request is answered with the
C{X-Prometheus-Remote-Write-*-Written} counts it asks for.
"""

from __future__ import annotations

from reductrai.formats import prometheus as formats
from reductrai.formats.items import PayloadContext
from reductrai.vendors.base import METRICS, Answer, Route, Vendor
from reductrai.vendors.common import endpoint_upstream, text_error

NAME = "prometheus"


def _success(body: bytes, context=None) -> Answer:
    content_type = context.content_type if context is not None else None
    if context is None or formats.protocol_version(content_type) != 2:
        return Answer(204, b"", None)
    # NOTE: a second parse, only for 2.0 requests: exemplar counts are not
    # items, so the route parser's result cannot give them.
    _, stats = formats.parse_with_stats(body, PayloadContext(path=context.path, content_type=content_type))
    headers = {name.encode("ascii"): value.encode("ascii") for name, value in formats.response_headers(stats).items()}
    return Answer(204, b"", None, headers)


def _route(name: str, path: str) -> Route:
    return Route(vendor=NAME, name=name, kind=METRICS, path=path, success=_success, parser=formats.parse)


ROUTES = (
    _route("write", "/api/v1/write"),
    _route("push", "/api/prom/push"),
    _route("write_mimir", "/prometheus/api/v1/write"),
)

VENDOR = Vendor(
    name=NAME,
    routes=ROUTES,
    credential_headers=frozenset({"authorization", "x-scope-orgid-token"}),
    credential_query=frozenset(),
    error=text_error,
    upstream_base=endpoint_upstream("prometheus.endpoint"),
)
