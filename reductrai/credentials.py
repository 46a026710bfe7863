"""
What may be stored or logged about a request, and what never may.

Credentials travel to the upstream untouched but are removed from
everything reductrai keeps: stored records, logs and metrics.  Hop-by-hop
headers (RFC 9110, section 7.6.1) belong to one connection and are neither
forwarded nor stored.
"""

from __future__ import annotations

from typing import Iterable
from urllib.parse import parse_qsl, urlencode

from twisted.web.http_headers import Headers

#: Headers that describe one connection, never forwarded (RFC 9110 7.6.1),
#: plus the framing headers that the outgoing connection sets itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Set by the connection to the upstream, not copied from the client.
CONNECTION_SPECIFIC = frozenset({b"host", b"content-length"})

#: Credential headers of every vendor, lower-case.  Vendors add their own.
COMMON_CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key"}
)

REDACTED = "<redacted>"


def hop_by_hop_names(headers: Headers) -> frozenset[bytes]:
    """
    Return the lower-case names of the hop-by-hop headers of a message:
    the fixed list plus every name listed in its C{Connection} header.
    """
    listed = set(HOP_BY_HOP)
    for value in headers.getRawHeaders(b"connection", []):
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                listed.add(token)
    return frozenset(listed)


def end_to_end_headers(headers: Headers, drop: Iterable[bytes] = CONNECTION_SPECIFIC) -> Headers:
    """
    Copy the end-to-end headers of a message, values unchanged and in
    order, without hop-by-hop headers and without C{drop}.
    """
    excluded = hop_by_hop_names(headers) | frozenset(drop)
    copy = Headers()
    for name, values in headers.getAllRawHeaders():
        if name.lower() not in excluded:
            copy.setRawHeaders(name, list(values))
    return copy


def storable_headers(headers: Headers, credential_headers: frozenset[str]) -> list[list[str]]:
    """
    Return the end-to-end request headers that may be stored, as
    C{[name, value]} pairs: no credentials, no connection-specific headers.
    """
    excluded = hop_by_hop_names(headers) | CONNECTION_SPECIFIC
    secret = credential_headers | COMMON_CREDENTIAL_HEADERS
    kept = []
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if lower in excluded or lower.decode("latin-1") in secret:
            continue
        text_name = name.decode("latin-1")
        for value in values:
            kept.append([text_name, value.decode("latin-1")])
    return kept


def storable_query(query: bytes, credential_query: frozenset[str]) -> str:
    """
    Return the query string without credential parameters; the other
    parameters keep their order.
    """
    if not query:
        return ""
    text = query.decode("latin-1")
    pairs = parse_qsl(text, keep_blank_values=True)
    if not any(name.lower() in credential_query for name, _ in pairs):
        return text
    return urlencode([(name, value) for name, value in pairs if name.lower() not in credential_query])


def storable_path(path: str, route_path: str, credential_in_path: bool) -> str:
    """
    Return the path with a credential segment replaced by C{<redacted>}
    (Datadog's C{/v1/input/<key>}).
    """
    if not credential_in_path or not path.startswith(route_path):
        return path
    rest = path[len(route_path) :]
    _, slash, tail = rest.partition("/")
    return route_path + REDACTED + (slash + tail if slash else "")
