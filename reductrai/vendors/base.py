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


class AnswerContext:
    """
    What an answer factory may use: the decoded body, the request's
    content type, headers and query, and its parsed items (parsed on first
    use of L{parsed}).

    @ivar parse_error: the L{PayloadError} parsing raised, if any.
    """

    def __init__(
        self,
        body: bytes,
        content_type: Optional[str],
        headers: Mapping[str, str],
        query: Mapping[str, list[str]],
        path: str,
        parse: Optional[Callable[[], object]] = None,
    ) -> None:
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self.query = query
        self.path = path
        self._parse = parse
        self._parsed: object = None
        self._done = False
        self.parse_error: Optional[Exception] = None

    @property
    def parsed(self):
        """
        The request's L{ParsedPayload}, or L{None} when the route has no
        parser; raises the parser's L{PayloadError} (also kept in
        L{parse_error}).
        """
        if not self._done:
            self._done = True
            if self._parse is not None:
                try:
                    self._parsed = self._parse()
                except Exception as error:
                    self.parse_error = error
        if self.parse_error is not None:
            raise self.parse_error
        return self._parsed

    @property
    def was_parsed(self) -> bool:
        return self._done


#: Builds the success answer of a route; it must not fail on bodies it
#: does not understand.
SuccessFactory = Callable[[bytes, AnswerContext], Answer]

#: Builds the vendor's error answer from a status, a reason and, when
#: known, the request.
ErrorFactory = Callable[..., Answer]

#: Parses a decoded body into items.
Parser = Callable[[bytes, object], object]


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
    return lambda body, context=None: answer


def empty_success(status: int = 204) -> SuccessFactory:
    """
    Return a success factory that answers C{status} with no body.
    """
    answer = Answer(status, b"", None)
    return lambda body, context=None: answer


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
    @ivar parser: parses the decoded body into items, or L{None} for
        routes stored and forwarded as opaque records.
    @ivar suffix: C{path} is a suffix (Elasticsearch C{/{index}/_bulk}).
    @ivar content_types: media types this route takes, when several
        vendors share a path (Loki's and Cortex's C{/api/prom/push});
        L{None} takes any.
    @ivar validate: whether a payload the parser rejects is answered with
        the vendor's 400 (and not stored) even when an upstream would have
        judged it; otherwise only store-only and sample modes reject it.
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
    parser: Optional[Parser] = None
    suffix: bool = False
    content_types: Optional[tuple[str, ...]] = None


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
    @ivar check: inspects a request before it is stored and returns the
        vendor's error answer for what the vendor rejects before reading
        the body (a missing token), or L{None}.
    """

    name: str
    routes: Sequence[Route]
    credential_headers: frozenset[str]
    credential_query: frozenset[str]
    error: ErrorFactory
    upstream_base: Callable[[str, Mapping[str, object]], Optional[str]]
    key_setting: Optional[str] = None
    key_header: Optional[bytes] = None
    check: Optional[Callable[["AnswerContext"], Optional[Answer]]] = None


@attrs.frozen
class Match:
    """
    The route a request path selected.
    """

    route: Route
    vendor: Vendor


class Router:
    """
    Find the route of a request: exact paths first, then the longest
    matching prefix, then suffixes.  Routes sharing a path are told apart
    by their C{content_types}.
    """

    def __init__(self, vendors: Sequence[Vendor]) -> None:
        self.vendors = list(vendors)
        self._exact: dict[str, list[Match]] = {}
        self._prefixes: list[tuple[str, Match]] = []
        self._suffixes: list[tuple[str, Match]] = []
        for vendor in vendors:
            for route in vendor.routes:
                match = Match(route, vendor)
                if route.prefix:
                    self._prefixes.append((route.path, match))
                elif route.suffix:
                    self._suffixes.append((route.path, match))
                else:
                    self._exact.setdefault(route.path, []).append(match)
        self._prefixes.sort(key=lambda entry: len(entry[0]), reverse=True)

    def match(self, path: str, content_type: Optional[str] = None) -> Optional[Match]:
        """
        Return the route for C{path} (without query string), or L{None}.
        """
        candidates = self._exact.get(path)
        if candidates is None and len(path) > 1 and path.endswith("/"):
            candidates = self._exact.get(path.rstrip("/"))
        if candidates:
            return _pick(candidates, content_type)
        for prefix, match in self._prefixes:
            if path.startswith(prefix):
                return match
        for suffix, match in self._suffixes:
            if path.endswith(suffix):
                return match
        return None


def media_type(content_type: Optional[str]) -> str:
    """
    Return the lower-case media type of a C{Content-Type} value, without
    parameters.
    """
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def _pick(candidates: list[Match], content_type: Optional[str]) -> Match:
    media = media_type(content_type)
    for match in candidates:
        types = match.route.content_types
        if types is None or media in types:
            return match
    return candidates[-1]
