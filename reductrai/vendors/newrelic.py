"""
New Relic's Telemetry and Event APIs.

Each API has its own host per region: C{metric-api}, C{log-api},
C{trace-api} and C{insights-collector} (US), and their EU counterparts.
Success is C{202 {"requestId": "<uuid>"}}.
"""

from __future__ import annotations

import json
import uuid
from typing import Mapping, Optional

from reductrai.formats import newrelic as formats
from reductrai.vendors.base import EVENTS, LOGS, METRICS, TRACES, Answer, Route, Vendor, json_answer

NAME = "newrelic"

REGION_HOSTS = {
    "us": {
        "metric": "https://metric-api.newrelic.com",
        "log": "https://log-api.newrelic.com",
        "trace": "https://trace-api.newrelic.com",
        "event": "https://insights-collector.newrelic.com",
    },
    "eu": {
        "metric": "https://metric-api.eu.newrelic.com",
        "log": "https://log-api.eu.newrelic.com",
        "trace": "https://trace-api.eu.newrelic.com",
        "event": "https://insights-collector.eu01.nr-data.net",
    },
}


def upstream_base(upstream: str, settings: Mapping[str, object]) -> Optional[str]:
    """
    Return C{proxy.forward_to}, then C{newrelic.endpoint}, then the host of
    the route's API in C{newrelic.region}, or L{None}.
    """
    for key in ("proxy.forward_to", "newrelic.endpoint"):
        if settings.get(key):
            return str(settings[key])
    region = settings.get("newrelic.region")
    if region:
        return REGION_HOSTS[str(region)][upstream]
    return None


def _accepted(body: bytes, context=None) -> Answer:
    return json_answer(202, {"requestId": str(uuid.uuid4())})


def error(status: int, reason: str, context=None) -> Answer:
    return Answer(status, json.dumps({"requestId": str(uuid.uuid4()), "error": reason}).encode(), b"application/json")


def _route(name: str, kind: str, path: str, upstream: str, **kwargs) -> Route:
    return Route(
        vendor=NAME, name=name, kind=kind, path=path, success=_accepted, upstream=upstream,
        parser=formats.PARSERS[name], **kwargs,
    )


ROUTES = (
    _route("metrics", METRICS, "/metric/v1", "metric"),
    _route("logs", LOGS, "/log/v1", "log"),
    _route("traces", TRACES, "/trace/v1", "trace"),
    _route("events", EVENTS, "/v1/accounts/", "event", prefix=True),
)

VENDOR = Vendor(
    name=NAME,
    routes=ROUTES,
    credential_headers=frozenset({"api-key", "x-license-key", "x-insert-key", "license-key", "x-api-key"}),
    credential_query=frozenset({"api-key", "license_key", "x-license-key", "x-insert-key", "api_key"}),
    error=error,
    upstream_base=upstream_base,
    key_setting="newrelic.api_key",
    key_header=b"Api-Key",
)
