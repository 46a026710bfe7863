"""
Forwarding requests to their upstream with treq.

One L{Forwarder} owns one persistent L{HTTPConnectionPool} and bounds the
number of upstream requests in flight with a L{DeferredSemaphore}.  What
goes up and what comes back is the client's and the upstream's message
unchanged, except for hop-by-hop headers and a C{Via} header.

treq's L{HTTPClient} always does three things a transparent proxy must
not: it wraps its agent in L{ContentDecoderAgent}, which adds
C{Accept-Encoding: gzip} to the request and gunzips a gzip response; it
re-encodes the URL through hyperlink, which percent-encodes characters
such as C{[}, C{]} and C{|} in the query; and it keeps cookies in a jar
shared by every request.  L{_TransparentAgent}, the agent under treq,
undoes the first two (it restores the client's C{Accept-Encoding}, hides
the response's C{Content-Encoding} from the decoder and sends the raw
request-target), and L{_NoCookies} keeps the jar empty.
"""

from __future__ import annotations

import time
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Optional

import attrs
import treq
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    DNSLookupError,
    TimeoutError as ConnectTimeoutError,
)
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.logger import Logger
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from hyperlink import EncodedURL
from zope.interface import implementer

from reductrai import __version__
from reductrai.credentials import end_to_end_headers

_RAW_URI = b"x-reductrai-raw-uri"
_ACCEPT_ENCODING = b"x-reductrai-accept-encoding"
_HIDDEN_CONTENT_ENCODING = b"x-reductrai-content-encoding"
VIA = b"1.1 reductrai"


class UpstreamError(Exception):
    """
    The upstream could not be reached or did not answer in time.

    @ivar status: the status the proxy answers the client with (502 or
        504).
    @ivar reason: what failed, safe to show to the client.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@attrs.frozen
class UpstreamResponse:
    """
    The upstream's answer, headers and body as received.
    """

    status: int
    phrase: bytes
    headers: Headers
    body: bytes


@implementer(IAgent)
class _TransparentAgent:
    """
    The agent treq wraps: sends the raw request-target, restores the
    client's C{Accept-Encoding} and hides the response's
    C{Content-Encoding} from treq's decoder.
    """

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent

    def request(self, method, uri, headers=None, bodyProducer=None):
        headers = headers.copy() if headers is not None else Headers()
        raw_uri = headers.getRawHeaders(_RAW_URI)
        if raw_uri:
            uri = raw_uri[0]
            headers.removeHeader(_RAW_URI)
        original = headers.getRawHeaders(_ACCEPT_ENCODING)
        headers.removeHeader(_ACCEPT_ENCODING)
        headers.removeHeader(b"accept-encoding")
        if original and original != [b""]:
            headers.setRawHeaders(b"accept-encoding", original)
        return self._agent.request(method, uri, headers, bodyProducer).addCallback(self._hide_encoding)

    @staticmethod
    def _hide_encoding(response):
        encoding = response.headers.getRawHeaders(b"content-encoding")
        if encoding:
            response.headers.removeHeader(b"content-encoding")
            response.headers.setRawHeaders(_HIDDEN_CONTENT_ENCODING, encoding)
        return response


def _was_cancelled(failure) -> bool:
    """
    Whether a request failed because treq's timeout cancelled it; the agent
    reports that as L{ResponseNeverReceived} or L{ResponseFailed} wrapping
    a L{defer.CancelledError}.
    """
    reasons = getattr(failure.value, "reasons", None) or []
    return any(reason.check(defer.CancelledError) for reason in reasons)


class _ResolvedURL(EncodedURL):
    """
    A URL whose URI form is computed once.

    treq turns the URL of every request into its URI text through
    hyperlink, IDNA encoding included; the forwarder sends every request of
    an upstream to the same base URL (the real target travels in
    C{_RAW_URI}), so the text is cached per base URL.
    """

    def to_uri(self) -> "_ResolvedURL":
        return self

    def to_text(self, with_password: bool = False) -> str:
        cached = self.__dict__.get("_cached_text")
        if cached is None:
            cached = self.__dict__["_cached_text"] = EncodedURL.to_text(self, with_password)
        return cached


def resolved_url(base_url: str) -> _ResolvedURL:
    """
    Parse a base URL once into a L{_ResolvedURL} for its path C{/}.
    """
    parsed = EncodedURL.from_text(base_url + "/").to_uri()
    return _ResolvedURL(
        scheme=parsed.scheme, host=parsed.host, port=parsed.port, path=parsed.path, query=parsed.query,
        rooted=parsed.rooted, userinfo=parsed.userinfo,
    )


class _NoDelayEndpoint:
    """
    A client endpoint whose connections disable Nagle's algorithm.

    The HTTP client writes a request's head and its body in separate
    reactor turns; with Nagle's algorithm on, the body then waits for the
    peer's delayed ACK of the head (tens of milliseconds on Linux).
    """

    def __init__(self, endpoint) -> None:
        self._endpoint = endpoint

    def connect(self, factory):
        return self._endpoint.connect(factory).addCallback(self._no_delay)

    @staticmethod
    def _no_delay(protocol):
        transport = protocol.transport
        while transport is not None:
            setter = getattr(transport, "setTcpNoDelay", None)
            if setter is not None:
                setter(True)
                break
            transport = getattr(transport, "transport", None)
        return protocol


@implementer(IAgentEndpointFactory)
class NoDelayEndpointFactory:
    """
    Build the forwarder's upstream endpoints: TCP with C{TCP_NODELAY}, and
    TLS verified by C{policy} for C{https} URLs.
    """

    def __init__(self, reactor, policy, connect_timeout: float) -> None:
        self._reactor = reactor
        self._policy = policy
        self._timeout = connect_timeout
        self._endpoints: dict = {}

    def endpointForURI(self, uri):
        # The agent asks for an endpoint on every request, pooled
        # connection or not; building one encodes the host name with IDNA.
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = self._build(uri)
        return endpoint

    def _build(self, uri):
        host = uri.host.decode("ascii")
        endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
        elif uri.scheme != b"http":
            raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
        return _NoDelayEndpoint(endpoint)


class _NoCookies(CookieJar):
    """
    A cookie jar that never stores a cookie, so that nothing an upstream
    sets reaches another client's request.
    """

    def __init__(self) -> None:
        super().__init__(policy=DefaultCookiePolicy(allowed_domains=[]))

    def extract_cookies(self, response, request) -> None:
        return None

    def set_cookie(self, cookie) -> None:
        return None


def trust_root(ca_bundle: Optional[str]):
    """
    Return the trust root for upstream TLS: the certificates of
    C{ca_bundle}, or the platform's CAs when it is empty.
    """
    if not ca_bundle:
        return None
    with open(ca_bundle, "rb") as handle:
        data = handle.read()
    marker = b"-----END CERTIFICATE-----"
    certificates = [
        Certificate.loadPEM(block + marker)
        for block in data.split(marker)
        if b"-----BEGIN CERTIFICATE-----" in block
    ]
    if not certificates:
        raise ValueError(f"no PEM certificate in CA bundle {ca_bundle}")
    return trustRootFromCertificates(certificates)


@attrs.define
class UpstreamState:
    """
    What the forwarder knows about one upstream base URL, for C{/health}.
    """

    url: str
    state: str = "unknown"
    last_success: Optional[float] = None
    last_failure: Optional[float] = None
    last_error: Optional[str] = None
    requests: int = 0
    failures: int = 0


class Forwarder:
    """
    Send requests upstream and collect the whole response.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        max_in_flight: int = 256,
        connect_timeout: float = 5.0,
        timeout: float = 30.0,
        ca_bundle: Optional[str] = None,
        agent: Optional[IAgent] = None,
    ) -> None:
        self._reactor = reactor
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = max_in_flight
        self.pool.cachedConnectionTimeout = 120
        if agent is None:
            agent = Agent.usingEndpointFactory(
                reactor,
                NoDelayEndpointFactory(
                    reactor, BrowserLikePolicyForHTTPS(trustRoot=trust_root(ca_bundle)), connect_timeout
                ),
                pool=self.pool,
            )
        self._client = treq.client.HTTPClient(_TransparentAgent(agent), cookiejar=_NoCookies())
        self._semaphore = defer.DeferredSemaphore(max_in_flight)
        self.timeout = timeout
        self.upstreams: dict[str, UpstreamState] = {}
        self._urls: dict[str, _ResolvedURL] = {}
        # Passing an (always empty) jar per request spares treq building a
        # new one from a dict on every call.
        self._no_cookies = _NoCookies()

    def state_of(self, base_url: str) -> UpstreamState:
        state = self.upstreams.get(base_url)
        if state is None:
            state = self.upstreams[base_url] = UpstreamState(base_url)
        return state

    def forward(
        self,
        base_url: str,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: Optional[bytes],
        display_path: str = "",
    ) -> "Deferred[UpstreamResponse]":
        """
        Send one request to C{base_url} + C{target} (the client's raw
        request-target, query string included).

        @param headers: the client's request headers; hop-by-hop headers,
            C{Host} and C{Content-Length} are dropped here.
        @param body: the body exactly as received, or L{None} for none.
        @return: a L{Deferred} firing with the L{UpstreamResponse}, or
            failing with L{UpstreamError} when the upstream could not be
            reached (502) or timed out (504).
        @param display_path: the path to name in logs, credentials removed.
        """
        return self._semaphore.run(self._forward, base_url, method, target, headers, body, display_path)

    def _forward(self, base_url, method, target, headers, body, display_path) -> Deferred:
        outgoing = end_to_end_headers(headers)
        accept = headers.getRawHeaders(b"accept-encoding")
        outgoing.setRawHeaders(_ACCEPT_ENCODING, accept or [b""])
        raw_url = base_url.encode("ascii") + target
        outgoing.setRawHeaders(_RAW_URI, [raw_url])
        outgoing.addRawHeader(b"via", VIA)
        state = self.state_of(base_url)
        state.requests += 1
        started = time.monotonic()
        url = self._urls.get(base_url)
        if url is None:
            url = self._urls[base_url] = resolved_url(base_url)
        d = self._client.request(
            method.decode("ascii"),
            url,
            headers=outgoing,
            cookies=self._no_cookies,
            data=body,
            allow_redirects=False,
            timeout=self.timeout,
            reactor=self._reactor,
        )
        d.addCallback(self._collect)
        d.addCallbacks(
            lambda response: self._succeeded(state, response, started),
            lambda failure: self._failed(state, failure, method, display_path),
        )
        return d

    def _collect(self, response) -> Deferred:
        def build(body: bytes) -> UpstreamResponse:
            headers = response.headers.copy()
            hidden = headers.getRawHeaders(_HIDDEN_CONTENT_ENCODING)
            if hidden:
                headers.removeHeader(_HIDDEN_CONTENT_ENCODING)
                headers.setRawHeaders(b"content-encoding", hidden)
            return UpstreamResponse(response.code, response.phrase, headers, body)

        return treq.content(response).addCallback(build)

    def _succeeded(self, state: UpstreamState, response: UpstreamResponse, started: float) -> UpstreamResponse:
        state.last_success = time.time()
        if response.status >= 500:
            state.state = "degraded"
        else:
            if state.state != "up":
                self.log.info("Upstream {url} is up", url=state.url)
            state.state = "up"
        self.last_latency = time.monotonic() - started
        return response

    def _failed(self, state: UpstreamState, failure, method: bytes, display_path: str):
        state.failures += 1
        state.last_failure = time.time()
        if failure.check(defer.CancelledError, ConnectTimeoutError) or _was_cancelled(failure):
            error = UpstreamError(504, f"upstream {state.url} timed out after {self.timeout:g} s")
        elif failure.check(DNSLookupError):
            error = UpstreamError(502, f"upstream host of {state.url} could not be resolved")
        elif failure.check(ConnectError, ConnectingCancelledError):
            error = UpstreamError(502, f"upstream {state.url} refused or failed the connection")
        elif failure.check(ResponseNeverReceived, ResponseFailed):
            error = UpstreamError(502, f"upstream {state.url} closed the connection without answering")
        else:
            error = UpstreamError(502, f"forwarding to {state.url} failed: {failure.type.__name__}")
        state.last_error = error.reason
        if state.state != "down":
            self.log.warn(
                "Upstream {url} is down: {reason} (request {method} {path})",
                url=state.url, reason=error.reason, method=method.decode("ascii"),
                path=display_path,
            )
        state.state = "down"
        raise error

    def close(self) -> Deferred:
        """
        Close the pooled connections.
        """
        return self.pool.closeCachedConnections()
