"""
The HTTP channel, request and site classes of the listeners.

Twisted's L{twisted.web.server.Request} spools bodies over 100 KB to a
temporary file and accepts any size.  L{IngestRequest} keeps the body in
memory up to C{max_body_bytes} and, past that, discards what arrives and
marks the request too large, so that the resource answers 413 without ever
holding more than the limit.

L{LimitedHTTPChannel} enforces the limits of L{reductrai.limits.ConnectionLimits}
before a request reaches a resource: 431 for too many or too large header
fields, 408 when a client goes silent in the middle of a request or takes
longer than the request deadline to send it (slow clients that trickle
bytes), and, through L{LimitedSite}, 503 beyond the connection limit and
403 for addresses outside the allowed networks.  Each refusal is counted
in C{reductrai_limits_hit} and closes the connection.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Optional

from OpenSSL import SSL
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.web import http, server

from reductrai.limits import ConnectionLimits
from reductrai.ratelimit import RateLimitedLog

_REASONS = {403: b"Forbidden", 408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


def _error_response(status: int, message: str) -> bytes:
    """
    Render a complete HTTP/1.1 error response that closes the connection.
    """
    body = json.dumps({"errors": [message]}).encode("utf-8")
    head = (
        b"HTTP/1.1 %d %s\r\nServer: reductrai\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (status, _REASONS[status], len(body))
    )
    return head + body


def _peer_host(transport) -> str:
    peer = transport.getPeer() if transport is not None else None
    return str(getattr(peer, "host", peer))


class RefusingProtocol(Protocol):
    """
    Answer one fixed error response as soon as the connection is made and
    close it, without reading the request.
    """

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message

    def connectionMade(self) -> None:
        self.transport.write(_error_response(self.status, self.message))
        self.transport.loseConnection()


class LimitedHTTPChannel(http.HTTPChannel):
    """
    An HTTP/1.1 channel that enforces the limits of its site.

    The site (a L{LimitedSite}) gives C{limits}; C{timeOut}, the silence
    allowed while a request is being received and between requests, comes
    from the factory as for every L{http.HTTPChannel}.
    """

    _log = Logger()
    _receiving = False
    _refused = False
    _got_data = False
    _counted = False
    _deadline_call = None

    @property
    def limits(self) -> ConnectionLimits:
        return self.site.limits

    def connectionMade(self) -> None:
        limits = self.limits
        self.maxHeaders = limits.max_header_count
        self.totalHeadersSize = limits.max_header_bytes
        self.MAX_LENGTH = limits.max_header_bytes
        limits.opened()
        self._counted = True
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        self._got_data = True
        if not self._receiving and not self._handlingRequest:
            self._receiving = True
            self._deadline_call = self.callLater(self.limits.request_deadline, self._deadline_passed)
        super().dataReceived(data)

    def lineReceived(self, line: bytes):
        if self._refused:
            return None
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            return self._refuse(431, "header_bytes", f"the request line and header fields exceed {self.totalHeadersSize} bytes")
        return super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes):
        return self._refuse(431, "header_bytes", f"the request line and header fields exceed {self.totalHeadersSize} bytes")

    def headerReceived(self, line: bytes) -> bool:
        if self._refused:
            return False
        if self._receivedHeaderCount >= self.maxHeaders:
            self._refuse(431, "header_count", f"a request may have at most {self.maxHeaders} header fields")
            return False
        return super().headerReceived(line)

    def allContentReceived(self) -> None:
        self._receiving = False
        self._cancel_deadline()
        super().allContentReceived()

    def timeoutConnection(self) -> None:
        if self._receiving and not self._handlingRequest:
            self._refuse(408, "idle_timeout", f"no data for {self.timeOut:g} seconds in the middle of a request")
            if self.abortTimeout is not None:
                self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
            return
        super().timeoutConnection()

    def _deadline_passed(self) -> None:
        self._deadline_call = None
        if self._receiving and not self._handlingRequest:
            self._refuse(408, "request_deadline", f"the request took longer than {self.limits.request_deadline:g} seconds to arrive")
            if self.abortTimeout is not None:
                self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)

    def _cancel_deadline(self) -> None:
        if self._deadline_call is not None and self._deadline_call.active():
            self._deadline_call.cancel()
        self._deadline_call = None

    def _refuse(self, status: int, limit: str, message: str) -> None:
        """
        Answer C{status} with C{message}, count the C{limit} and close.
        """
        if self._refused:
            return None
        self._refused = True
        self._cancel_deadline()
        self.setTimeout(None)
        self.limits.hit(limit)
        self.site.limit_log.emit(
            f"{self.limits.role}:{limit}",
            LogLevel.warn,
            "Refused a {role} request from {peer} with {status}: {message}",
            role=self.limits.role, peer=_peer_host(self.transport), status=status, message=message,
        )
        self.transport.write(_error_response(status, message))
        self.loseConnection()
        return None

    def connectionLost(self, reason) -> None:
        self._cancel_deadline()
        if self._counted:
            self._counted = False
            self.limits.closed()
        if not self._got_data and reason.check(SSL.Error):
            metrics = self.limits.metrics
            if metrics is not None:
                metrics.tls_handshake_failures.labels(self.limits.role).inc()
            self.site.limit_log.emit(
                f"{self.limits.role}:tls",
                LogLevel.info,
                "TLS handshake with {peer} failed: {error}",
                peer=_peer_host(self.transport), error=reason.getErrorMessage(),
            )
        super().connectionLost(reason)


class IngestRequest(server.Request):
    """
    A request whose body is held in memory with a size cap.

    The cap is the C{max_body_bytes} attribute of the site.
    """

    too_large = False
    received_bytes = 0

    def gotLength(self, length):
        limit = self.channel.site.max_body_bytes
        self.content = BytesIO()
        if length is not None and length > limit:
            self.too_large = True

    def handleContentChunk(self, data):
        self.received_bytes += len(data)
        if self.too_large:
            return
        if self.received_bytes > self.channel.site.max_body_bytes:
            self.too_large = True
            self.content = BytesIO()
            return
        self.content.write(data)


class LimitedSite(server.Site):
    """
    A site whose connections are L{LimitedHTTPChannel}s, with no access log
    of its own (request-targets may hold API keys; the resources log what
    matters, without credentials).

    A connection from outside the allowed networks gets 403, one beyond the
    connection limit 503; both are closed at once.
    """

    protocol = LimitedHTTPChannel
    default_role = "admin"

    def __init__(self, resource, limits: Optional[ConnectionLimits] = None, **kwargs) -> None:
        super().__init__(resource, **kwargs)
        self.limits = limits if limits is not None else ConnectionLimits(role=self.default_role)
        self.limit_log = RateLimitedLog(Logger(namespace="reductrai.limits"))

    def buildProtocol(self, addr):
        limits = self.limits
        host = getattr(addr, "host", None)
        if not limits.allow.allows(host):
            limits.hit("network")
            self.limit_log.emit(
                f"{limits.role}:network", LogLevel.warn,
                "Refused a {role} connection from {peer}: not in limits.allow_networks",
                role=limits.role, peer=str(host),
            )
            return RefusingProtocol(403, "this address may not connect")
        if limits.open_connections >= limits.max_connections:
            limits.hit("connections")
            self.limit_log.emit(
                f"{limits.role}:connections", LogLevel.warn,
                "Refused a {role} connection from {peer}: {count} connections are open",
                role=limits.role, peer=str(host), count=limits.open_connections,
            )
            return RefusingProtocol(503, "too many open connections; retry later")
        return super().buildProtocol(addr)

    def log(self, request) -> None:
        return None


class IngestSite(LimitedSite):
    """
    A site serving L{IngestRequest} with a body cap.
    """

    requestFactory = IngestRequest
    default_role = "ingest"

    def __init__(self, resource, max_body_bytes: int, timeout: float, limits: Optional[ConnectionLimits] = None, **kwargs) -> None:
        # Telemetry bodies are never HTML forms: skipping twisted.web's
        # form parsing saves a Content-Type parse on every request.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, limits=limits, timeout=timeout, **kwargs)
        self.max_body_bytes = max_body_bytes


class QuietSite(LimitedSite):
    """
    The site of the admin listener that probes hit every few seconds.
    """
