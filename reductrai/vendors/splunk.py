"""
Splunk HTTP Event Collector.

HEC answers with C{{"text": ..., "code": N}} bodies and its own codes:
a missing token is 401 code 2, a token not in the C{Splunk <token>} form
401 code 3, a raw request without a channel 400 code 10, invalid data 400
code 6 with the faulty event's number.
"""

from __future__ import annotations

import json
from typing import Optional

from reductrai.formats import splunk as formats
from reductrai.vendors.base import LOGS, METADATA, Answer, Route, Vendor
from reductrai.vendors.common import endpoint_upstream

NAME = "splunk"
TOKEN_REQUIRED = 2
INVALID_AUTHORIZATION = 3
CHANNEL_MISSING = 10
HEALTHY = 17


def hec_answer(code: int, invalid_event_number: Optional[int] = None) -> Answer:
    status = formats.HEC_ERRORS[code].http_status
    body = formats.response_body(code, invalid_event_number)
    return Answer(status, json.dumps(body, separators=(",", ":")).encode("utf-8"), b"application/json")


def error(status: int, reason: str, context=None) -> Answer:
    failure = getattr(context, "parse_error", None)
    if isinstance(failure, formats.HecError):
        return hec_answer(failure.code, failure.invalid_event_number)
    return Answer(status, json.dumps({"text": reason, "code": 6 if status == 400 else status}).encode(), b"application/json")


def check_request(context) -> Optional[Answer]:
    """
    Reject what HEC rejects before looking at the body: a missing or
    malformed token, and a raw request without a channel.
    """
    authorization = context.headers.get("authorization")
    if not authorization and not context.query.get("token"):
        return hec_answer(TOKEN_REQUIRED)
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() not in ("splunk", "bearer", "basic") or not token.strip():
            return hec_answer(INVALID_AUTHORIZATION)
    if context.path.startswith("/services/collector/raw"):
        if not context.headers.get("x-splunk-request-channel") and not context.query.get("channel"):
            return hec_answer(CHANNEL_MISSING)
    return None


def _success(body: bytes, context=None) -> Answer:
    return hec_answer(0)


def _health(body: bytes, context=None) -> Answer:
    return hec_answer(HEALTHY)


def _route(name: str, path: str, shape: str) -> Route:
    return Route(vendor=NAME, name=name, kind=LOGS, path=path, success=_success, parser=formats.PARSERS[shape])


ROUTES = (
    _route("event", "/services/collector", "event"),
    _route("event_path", "/services/collector/event", "event"),
    _route("event_1_0", "/services/collector/event/1.0", "event"),
    _route("event_legacy", "/event/1.0", "event"),
    _route("raw", "/services/collector/raw", "raw"),
    _route("raw_1_0", "/services/collector/raw/1.0", "raw"),
    Route(
        vendor=NAME, name="health", kind=METADATA, path="/services/collector/health", success=_health,
        methods=frozenset({b"GET", b"HEAD"}),
    ),
)

VENDOR = Vendor(
    name=NAME,
    routes=ROUTES,
    credential_headers=frozenset({"authorization"}),
    credential_query=frozenset({"token"}),
    error=error,
    upstream_base=endpoint_upstream("splunk.endpoint"),
    check=check_request,
)
