"""
InfluxDB line protocol writes: C{/write} (1.x) and C{/api/v2/write} (2.x),
plus C{/ping} for agents such as Telegraf.  Success is 204.
"""

from __future__ import annotations

import json

from reductrai.formats import influx as formats
from reductrai.vendors.base import METADATA, METRICS, Answer, Route, Vendor, empty_success
from reductrai.vendors.common import endpoint_upstream

NAME = "influxdb"


def error(status: int, reason: str, context=None) -> Answer:
    path = getattr(context, "path", "")
    if path == "/write":
        document = {"error": reason}
    else:
        document = {"code": "invalid" if status < 500 else "internal error", "message": reason}
    return Answer(status, json.dumps(document).encode("utf-8"), b"application/json; charset=utf-8")


ROUTES = (
    Route(vendor=NAME, name="write_v1", kind=METRICS, path="/write", success=empty_success(204), parser=formats.PARSERS["write_v1"]),
    Route(vendor=NAME, name="write_v2", kind=METRICS, path="/api/v2/write", success=empty_success(204), parser=formats.PARSERS["write_v2"]),
    Route(vendor=NAME, name="ping", kind=METADATA, path="/ping", success=empty_success(204), methods=frozenset({b"GET", b"HEAD"})),
)

VENDOR = Vendor(
    name=NAME,
    routes=ROUTES,
    credential_headers=frozenset({"authorization"}),
    credential_query=frozenset({"p", "u", "token"}),
    error=error,
    upstream_base=endpoint_upstream("influxdb.endpoint"),
)
