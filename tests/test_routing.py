"""
Routing by path, credential scrubbing and the Datadog upstream hosts.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

from reductrai.credentials import end_to_end_headers, storable_headers, storable_path, storable_query
from reductrai.vendors import datadog
from reductrai.vendors.registry import default_router


def test_datadog_paths_route_by_path():
    """
    Each Datadog path maps to its route, kind and upstream group.
    """
    router = default_router()
    expected = {
        "/api/v1/series": ("series_v1", "metrics", "api"),
        "/api/v2/series": ("series_v2", "metrics", "api"),
        "/api/v2/logs": ("logs_v2", "logs", "logs"),
        "/v1/input": ("logs_v1", "logs", "logs"),
        "/v1/input/abc": ("logs_v1_key", "logs", "logs"),
        "/api/v0.2/traces": ("traces", "traces", "trace"),
        "/api/v2/events": ("events_v2", "events", "event_intake"),
        "/intake/": ("intake", "metadata", "api"),
        "/api/v1/check_run": ("check_run", "service_checks", "api"),
        "/api/v1/whatever/else": ("api_other", "opaque", "api"),
    }
    for path, (name, kind, upstream) in expected.items():
        match = router.match(path)
        assert match is not None, path
        assert (match.route.name, match.route.kind, match.route.upstream) == (name, kind, upstream), path
    assert router.match("/favicon.ico") is None


def test_site_picks_every_host():
    """
    A site setting selects the site's api, logs, trace and event hosts;
    forward_to overrides them all; nothing configured means no upstream.
    """
    settings = {"datadog.site": "datadoghq.eu"}
    assert datadog.upstream_base("api", settings) == "https://api.datadoghq.eu"
    assert datadog.upstream_base("logs", settings) == "https://http-intake.logs.datadoghq.eu"
    assert datadog.upstream_base("trace", settings) == "https://trace.agent.datadoghq.eu"
    assert datadog.upstream_base("event_intake", settings) == "https://event-management-intake.datadoghq.eu"
    settings["proxy.forward_to"] = "http://127.0.0.1:9"
    assert datadog.upstream_base("logs", settings) == "http://127.0.0.1:9"
    assert datadog.upstream_base("api", {}) is None


def test_credentials_removed_for_storage():
    """
    Keys in headers, query and path never reach the stored form.
    """
    headers = Headers(
        {
            b"DD-API-KEY": [b"k1"], b"Authorization": [b"Bearer k2"], b"Content-Type": [b"application/json"],
            b"Connection": [b"keep-alive, X-Hop"], b"X-Hop": [b"1"], b"Host": [b"h"], b"User-Agent": [b"ua"],
        }
    )
    stored = storable_headers(headers, datadog.VENDOR.credential_headers)
    names = {name.lower() for name, _ in stored}
    assert names == {"content-type", "user-agent"}
    assert storable_query(b"ddtags=env:a&api_key=k3&x=1", datadog.VENDOR.credential_query) == "ddtags=env%3Aa&x=1"
    assert storable_query(b"ddtags=env:a", datadog.VENDOR.credential_query) == "ddtags=env:a"
    assert storable_path("/v1/input/k4", "/v1/input/", True) == "/v1/input/<redacted>"
    forwarded = end_to_end_headers(headers)
    assert forwarded.getRawHeaders(b"dd-api-key") == [b"k1"]
    assert not forwarded.hasHeader(b"x-hop")
    assert not forwarded.hasHeader(b"connection")
    assert not forwarded.hasHeader(b"host")
