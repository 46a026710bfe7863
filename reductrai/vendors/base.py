"""
The route table model shared by every vendor.
"""

from __future__ import annotations

import json
from typing import Callable, Mapping, Optional, Sequence

import attrs

# Route kinds: what telemetry a route carries.
METRICS = "metrics"
LOGS = "logs"
TRACES = "traces"
EVENTS = "events"
SERVICE_CHECKS = "service_checks"
METADATA = "metadata"
OPAQUE = "opaque"


@attrs.frozen
class Answer:
    """
    A complete HTTP answer the proxy gives itself (success when nothing is
    forwarded, or an error in the vendor's style).
    """

    status: int
    body: bytes = b""
    content_type: Optional[bytes] = b"application/json"
    headers: Mapping[bytes, bytes] = attrs.field(factory=dict)


#: Builds the success answer of a route from the decoded request body; it
#: must not fail on bodies it does not understand.
SuccessFactory = Callable[[bytes], Answer]


def json_answer(status: int, document: object) -> Answer:
    """
    Return an answer holding C{document} as compact JSON.
    """
    return Answer(status, json.dumps(document, separators=(",", ":")).encode())


def fixed_success(status: int, document: object) -> SuccessFactory:
    """
    Return a success factory that always gives the same JSON answer.
    """
    answer = json_answer(status, document)
    return lambda body: answer


@attrs.frozen
class Route:
    """
    One path (or path prefix) of a vendor.

    @ivar name: short route name, unique within the vendor (C{"series_v2"}).
    @ivar path: the exact path, or the prefix when C{prefix} is true.
    @ivar methods: the HTTP methods accepted.
    @ivar upstream: which of the vendor's upstream hosts serves it.
    @ivar credential_in_path: the path segment after C{path} is an API key
        (Datadog's C{/v1/input/<key>}); it is removed before storing.
    @ivar parser: the name of the payload shape, for the parsers.
    """

    vendor: str
    name: str
    kind: str
    path: str
    success: SuccessFactory
    methods: frozenset[bytes] = frozenset({b"POST"})
    upstream: str = "api"
    prefix: bool = False
    credential_in_path: bool = False
    parser: Optional[str] = None


@attrs.frozen
class Vendor:
    """
    A vendor's routes and conventions.

    @ivar credential_headers: lower-case header names that carry
        credentials: passed to the upstream, never stored or logged.
    @ivar credential_query: lower-case query parameter names that carry
        credentials.
    @ivar error: builds the vendor's error answer from a status and a
        reason.
    @ivar upstream_base: maps a route's C{upstream} to a base URL, given
        the settings; returns L{None} when no upstream is configured.
    @ivar key_setting: the setting holding an API key to add to forwarded
        requests that carry no credential of this vendor.
    @ivar key_header: the header that key is sent in.
    """

    name: str
    routes: Sequence[Route]
    credential_headers: frozenset[str]
    credential_query: frozenset[str]
    error: Callable[[int, str], Answer]
    upstream_base: Callable[[str, Mapping[str, object]], Optional[str]]
    key_setting: Optional[str] = None
    key_header: Optional[bytes] = None


@attrs.frozen
class Match:
    """
    The route a request path selected.
    """

    route: Route
    vendor: Vendor


class Router:
    """
    Find the route of a request path: exact paths first, then the longest
    matching prefix.
    """

    def __init__(self, vendors: Sequence[Vendor]) -> None:
        self.vendors = list(vendors)
        self._exact: dict[str, Match] = {}
        self._prefixes: list[tuple[str, Match]] = []
        for vendor in vendors:
            for route in vendor.routes:
                match = Match(route, vendor)
                if route.prefix:
                    self._prefixes.append((route.path, match))
                elif route.path in self._exact:
                    raise ValueError(f"duplicate route for {route.path}")
                else:
                    self._exact[route.path] = match
        self._prefixes.sort(key=lambda entry: len(entry[0]), reverse=True)

    def match(self, path: str) -> Optional[Match]:
        """
        Return the route for C{path} (without query string), or L{None}.
        """
        found = self._exact.get(path)
        if found is not None:
            return found
        if len(path) > 1 and path.endswith("/"):
            found = self._exact.get(path.rstrip("/"))
            if found is not None:
                return found
        for prefix, match in self._prefixes:
            if path.startswith(prefix):
                return match
        return None
