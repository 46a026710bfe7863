"""
Elasticsearch's bulk API: C{/_bulk} and C{/{index}/_bulk}, POST or PUT.

Answers carry C{X-Elastic-Product: Elasticsearch}, which the 8.x and 9.x
clients require, and use the compatible-with version the client asked for.
"""

from __future__ import annotations

import json
import re
import time

from reductrai.formats import elasticsearch as formats
from reductrai.formats.items import PayloadContext
from reductrai.vendors.base import LOGS, METADATA, Answer, Route, Vendor
from reductrai.vendors.common import endpoint_upstream

NAME = "elasticsearch"
PRODUCT = {b"x-elastic-product": b"Elasticsearch"}
_COMPATIBLE = re.compile(r"compatible-with\s*=\s*(\d+)")


def _content_type(context) -> bytes:
    accept = ""
    if context is not None:
        accept = context.headers.get("accept") or context.content_type or ""
    found = _COMPATIBLE.search(accept)
    if found:
        return f"application/vnd.elasticsearch+json;compatible-with={found.group(1)}".encode("ascii")
    return b"application/json"


def error(status: int, reason: str, context=None) -> Answer:
    kind = "illegal_argument_exception" if status == 400 else "status_exception"
    document = {
        "error": {"root_cause": [{"type": kind, "reason": reason}], "type": kind, "reason": reason},
        "status": status,
    }
    return Answer(status, json.dumps(document).encode("utf-8"), _content_type(context), PRODUCT)


def _bulk_success(body: bytes, context) -> Answer:
    # NOTE: this parses the body a second time, because the items the route
    # parser returns do not keep a rejected action's name and index.
    started = time.monotonic()
    actions = formats.parse_actions(body, PayloadContext(path=context.path, content_type=context.content_type, query=context.query))
    took = max(1, int((time.monotonic() - started) * 1000))
    document = formats.build_bulk_response(actions, took)
    return Answer(200, json.dumps(document, separators=(",", ":")).encode("utf-8"), _content_type(context), PRODUCT)


def _info(body: bytes, context) -> Answer:
    document = {
        "name": "reductrai",
        "cluster_name": "reductrai",
        "version": {"number": "9.0.0", "build_flavor": "default"},
        "tagline": "You Know, for Search",
    }
    return Answer(200, json.dumps(document).encode("utf-8"), _content_type(context), PRODUCT)


_BULK_METHODS = frozenset({b"POST", b"PUT"})

ROUTES = (
    Route(vendor=NAME, name="bulk", kind=LOGS, path="/_bulk", success=_bulk_success, parser=formats.parse, methods=_BULK_METHODS),
    Route(
        vendor=NAME, name="bulk_index", kind=LOGS, path="/_bulk", success=_bulk_success, parser=formats.parse,
        methods=_BULK_METHODS, suffix=True,
    ),
    Route(vendor=NAME, name="info", kind=METADATA, path="/", success=_info, methods=frozenset({b"GET", b"HEAD"})),
)

VENDOR = Vendor(
    name=NAME,
    routes=ROUTES,
    credential_headers=frozenset({"authorization", "x-api-key"}),
    credential_query=frozenset(),
    error=error,
    upstream_base=endpoint_upstream("elasticsearch.endpoint"),
)
