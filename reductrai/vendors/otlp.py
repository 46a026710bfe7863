"""
OTLP/HTTP: C{/v1/traces}, C{/v1/metrics} and C{/v1/logs}, protobuf or JSON.

Answers use the request's encoding: an C{Export*ServiceResponse}, with
C{partial_success} when items were rejected, or a C{google.rpc.Status} for
errors (the OTLP/HTTP specification's failure body).
"""

from __future__ import annotations

import json

from reductrai.formats import otlp as formats
from reductrai.vendors.base import LOGS, METRICS, TRACES, Answer, Route, Vendor
from reductrai.vendors.common import endpoint_upstream

NAME = "otlp"

#: google.rpc.Code values used in error bodies.
_GRPC_CODES = {400: 3, 413: 8, 415: 3, 401: 16, 403: 7, 404: 5, 405: 12, 429: 8, 502: 14, 503: 14, 504: 4}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def status_body(code: int, message: str, json_body: bool) -> bytes:
    """
    Encode a C{google.rpc.Status} (field 1 code, field 2 message) as
    protobuf or OTLP/JSON.
    """
    if json_body:
        return json.dumps({"code": code, "message": message}).encode("utf-8")
    text = message.encode("utf-8")
    return b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text


def error(status: int, reason: str, context=None) -> Answer:
    content_type = getattr(context, "content_type", None)
    json_body = formats.is_json(content_type)
    return Answer(
        status,
        status_body(_GRPC_CODES.get(status, 2), reason, json_body),
        formats.response_content_type(content_type).encode("ascii"),
    )


def _success(signal: str):
    def answer(body: bytes, context) -> Answer:
        parsed = context.parsed if context is not None else None
        rejected = parsed.rejected if parsed is not None else 0
        message = "; ".join(parsed.errors[:5]) if parsed is not None and parsed.errors else ""
        content_type = context.content_type if context is not None else None
        return Answer(
            200,
            formats.encode_response(content_type, rejected, message, signal),
            formats.response_content_type(content_type).encode("ascii"),
        )

    return answer


def _route(name: str, kind: str, path: str, signal: str) -> Route:
    return Route(
        vendor=NAME, name=name, kind=kind, path=path, success=_success(signal), parser=formats.parse,
    )


ROUTES = (
    _route("traces", TRACES, "/v1/traces", formats.TRACES),
    _route("metrics", METRICS, "/v1/metrics", formats.METRICS),
    _route("logs", LOGS, "/v1/logs", formats.LOGS),
)

VENDOR = Vendor(
    name=NAME,
    routes=ROUTES,
    credential_headers=frozenset({"api-key", "authorization", "x-api-key", "x-honeycomb-team", "dd-api-key", "lightstep-access-token"}),
    credential_query=frozenset(),
    error=error,
    upstream_base=endpoint_upstream("otlp.endpoint"),
)
