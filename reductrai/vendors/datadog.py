"""
Datadog's intake routes.

Datadog splits its intake over several hosts per site: C{api.<site>} for
metrics, events, service checks and metadata, C{http-intake.logs.<site>}
for logs, C{trace.agent.<site>} for traces and
C{event-management-intake.<site>} for v2 events.  Requests are routed by
path, never by C{Host}, because clients pointed at one base URL send every
kind there.

The success answers are the ones Datadog's intake gives.  datadogpy treats
any JSON answer holding an C{errors} key as a failure, so the v1 routes
answer C{{"status":"ok"}} and only C{/api/v2/series} answers
C{{"errors":[]}}.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Callable, Mapping, Optional

from reductrai.vendors.base import (
    EVENTS,
    LOGS,
    METADATA,
    METRICS,
    OPAQUE,
    SERVICE_CHECKS,
    TRACES,
    Answer,
    Route,
    Vendor,
    fixed_success,
    json_answer,
    media_type,
)

NAME = "datadog"

#: Upstream host prefix of each route group, joined with the site.
HOST_PREFIXES = {
    "api": "api",
    "logs": "http-intake.logs",
    "trace": "trace.agent",
    "event_intake": "event-management-intake",
}


def upstream_base(upstream: str, settings: Mapping[str, object]) -> Optional[str]:
    """
    Return the base URL for a Datadog route group: C{proxy.forward_to}, then
    C{datadog.endpoint}, then the hosts of C{datadog.site}, or L{None} when
    none is set (store-only).
    """
    forward_to = settings.get("proxy.forward_to")
    if forward_to:
        return str(forward_to)
    if upstream == "agent":
        # Tracer payloads only make sense to a Datadog Agent, never to the
        # public intake.
        agent = settings.get("datadog.agent_endpoint")
        return str(agent) if agent else None
    endpoint = settings.get("datadog.endpoint")
    if endpoint:
        return str(endpoint)
    site = settings.get("datadog.site")
    if site:
        return site_url(upstream, str(site))
    return None


def site_url(upstream: str, site: str) -> str:
    """
    Return the intake base URL of a route group on a Datadog site, e.g.
    C{https://http-intake.logs.datadoghq.eu} for C{("logs", "datadoghq.eu")}.
    """
    return f"https://{HOST_PREFIXES[upstream]}.{site}"


def error(status: int, reason: str, context=None) -> Answer:
    """
    Datadog's error body: C{{"errors": [reason]}}.
    """
    return json_answer(status, {"errors": [reason]})


def _event_v1_success(body: bytes, context=None) -> Answer:
    """
    Echo a v1 event the way the intake does, with a fresh event id.
    """
    try:
        event = json.loads(body)
    except ValueError:
        event = {}
    if not isinstance(event, dict):
        event = {}
    event_id = secrets.randbits(62) | (1 << 62)
    echo = {
        "id": event_id,
        "id_str": str(event_id),
        "title": event.get("title"),
        "text": event.get("text"),
        "date_happened": event.get("date_happened") or int(time.time()),
        "handle": None,
        "priority": event.get("priority"),
        "related_event_id": event.get("related_event_id"),
        "tags": event.get("tags"),
        "url": f"/event/event?id={event_id}",
    }
    return json_answer(202, {"status": "ok", "event": echo})


def _event_v2_success(body: bytes, context=None) -> Answer:
    event_id = "AZ" + secrets.token_hex(10)
    return json_answer(
        202,
        {
            "data": {"attributes": {"attributes": {"evt": {"id": event_id, "id_str": "", "uid": ""}}}, "type": "event"},
            "links": {},
        },
    )


_OK_V1 = fixed_success(202, {"status": "ok"})
_EMPTY_202 = fixed_success(202, {})
_GET_POST = frozenset({b"GET", b"POST"})
_PUT_POST = frozenset({b"PUT", b"POST"})
#: The Agent's answer to a tracer: the sampling rates it should apply
#: (all traces kept: reductrai samples on its own).
_TRACER_OK = fixed_success(200, {"rate_by_service": {"service:,env:": 1}})


def _json_or_agent(shape: Optional[str]) -> Callable:
    """
    Return the parser of a route: the Agent's protobuf or msgpack payload
    when the content type says so (or the route has no JSON form), the
    client libraries' JSON otherwise.
    """
    from reductrai.formats import datadog as json_formats
    from reductrai.formats import datadog_agent

    json_parser = json_formats.PARSERS.get(shape) if shape else None

    def parse(body: bytes, context) -> object:
        if json_parser is None or media_type(context.content_type) in _BINARY_TYPES:
            return datadog_agent.parse(body, context)
        return json_parser(body, context)

    return parse


_BINARY_TYPES = frozenset({"application/x-protobuf", "application/msgpack", "application/x-msgpack"})


def _route(name: str, kind: str, path: str, success, parser: Optional[str] = None, agent: bool = False, **kwargs) -> Route:
    if parser is not None or agent:
        kwargs["parser"] = _json_or_agent(parser)
    return Route(vendor=NAME, name=name, kind=kind, path=path, success=success, **kwargs)


ROUTES = (
    _route("series_v1", METRICS, "/api/v1/series", _OK_V1, parser="series_v1"),
    _route("series_v2", METRICS, "/api/v2/series", fixed_success(202, {"errors": []}), parser="series_v2"),
    _route("distribution_points", METRICS, "/api/v1/distribution_points", _OK_V1, parser="distribution_points"),
    _route("sketches", METRICS, "/api/beta/sketches", _EMPTY_202, agent=True),
    _route("check_run", SERVICE_CHECKS, "/api/v1/check_run", _OK_V1, parser="check_run"),
    _route("events_v1", EVENTS, "/api/v1/events", _event_v1_success, parser="events_v1"),
    _route("events_v2", EVENTS, "/api/v2/events", _event_v2_success, upstream="event_intake", parser="events_v2"),
    _route("logs_v2", LOGS, "/api/v2/logs", _EMPTY_202, upstream="logs", parser="logs_v2"),
    _route("logs_v1", LOGS, "/v1/input", fixed_success(200, {}), upstream="logs", parser="logs_v1"),
    _route(
        "logs_v1_key", LOGS, "/v1/input/", fixed_success(200, {}),
        upstream="logs", prefix=True, credential_in_path=True, parser="logs_v1",
    ),
    _route("traces", TRACES, "/api/v0.2/traces", _EMPTY_202, upstream="trace", agent=True),
    _route("trace_stats", TRACES, "/api/v0.2/stats", _EMPTY_202, upstream="trace"),
    # What tracing libraries send to a local Datadog Agent (msgpack).
    _route("tracer_v03", TRACES, "/v0.3/traces", _TRACER_OK, upstream="agent", agent=True, methods=_PUT_POST),
    _route("tracer_v04", TRACES, "/v0.4/traces", _TRACER_OK, upstream="agent", agent=True, methods=_PUT_POST),
    _route("tracer_v05", TRACES, "/v0.5/traces", _TRACER_OK, upstream="agent", agent=True, methods=_PUT_POST),
    _route("intake", METADATA, "/intake/", _EMPTY_202, prefix=True),
    _route("validate", METADATA, "/api/v1/validate", fixed_success(200, {"valid": True}), methods=_GET_POST),
    _route("metadata", METADATA, "/api/v1/metadata", _EMPTY_202),
    _route("host_metadata", METADATA, "/api/v2/host_metadata", _EMPTY_202),
    _route(
        "api_other", OPAQUE, "/api/", _EMPTY_202, prefix=True,
        methods=frozenset({b"GET", b"POST", b"PUT", b"PATCH", b"DELETE"}),
    ),
)

VENDOR = Vendor(
    name=NAME,
    routes=ROUTES,
    credential_headers=frozenset({"dd-api-key", "dd-application-key", "authorization", "x-datadog-api-key"}),
    credential_query=frozenset({"api_key", "application_key", "dd-api-key"}),
    error=error,
    upstream_base=upstream_base,
    key_setting="datadog.api_key",
    key_header=b"DD-API-KEY",
)
