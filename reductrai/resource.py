"""
The ingest resource: one twisted.web resource serving every vendor route.

For each request it finds the route, checks the method and the body size,
decodes the body for storage, stores it, forwards it untouched and answers
the client.  Which of those happen depends on the proxy mode:

  - C{forward}: store and forward; the client gets the upstream's answer.
    A vendor without a configured upstream is served as in C{store-only}.
  - C{store-only}: store; the client gets the vendor's success answer once
    the record is committed.
  - C{forward-only}: forward without decoding or storing.
"""

from __future__ import annotations

from typing import Mapping, Optional

from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from reductrai.credentials import end_to_end_headers, storable_headers, storable_path, storable_query
from reductrai.encoding import CorruptBody, DecodedTooLarge, EncodingError, UnsupportedEncoding, decode_body
from reductrai.forward import Forwarder, UpstreamError, UpstreamResponse
from reductrai.metrics import Metrics
from reductrai.ratelimit import RateLimitedLog
from reductrai.store import RecordStore, StoreError, StoreFull
from reductrai.vendors.base import Answer, Match, Router, json_answer

SERVER = b"reductrai"


def _no_route(status: int, reason: str) -> Answer:
    return json_answer(status, {"errors": [reason]})


class IngestResource(Resource):
    """
    Serve every vendor route of a L{Router}.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        router: Router,
        settings: Mapping[str, object],
        mode: str,
        store: Optional[RecordStore],
        forwarder: Optional[Forwarder],
        metrics: Metrics,
    ) -> None:
        super().__init__()
        self.router = router
        self.settings = settings
        self.mode = mode
        self.store = store
        self.forwarder = forwarder
        self.metrics = metrics
        self.max_decoded_bytes = int(settings["limits.max_decoded_bytes"])
        self._errors = RateLimitedLog(self.log)

    def render(self, request):
        request.setHeader(b"server", SERVER)
        path = request.path.decode("latin-1")
        match = self.router.match(path)
        if match is None:
            return self._reject(request, None, _no_route(404, f"no route for {path}"), "unknown_path")
        route, vendor = match.route, match.vendor

        if request.method not in route.methods:
            allowed = b", ".join(sorted(route.methods))
            request.setHeader(b"allow", allowed)
            answer = vendor.error(405, f"method {request.method.decode('latin-1')} is not allowed on {route.path}; allowed: {allowed.decode()}")
            return self._reject(request, match, answer, "method_not_allowed")

        if request.too_large:
            request.setHeader(b"connection", b"close")
            request.channel.persistent = False
            limit = request.channel.site.max_body_bytes
            answer = vendor.error(413, f"request body exceeds the limit of {limit} bytes")
            return self._reject(request, match, answer, "body_too_large")

        body = request.content.getvalue()
        encoding_header = request.getHeader(b"content-encoding")
        encoding = encoding_header.decode("latin-1") if encoding_header is not None else None
        kind_labels = (vendor.name, route.kind)
        self.metrics.received_bytes.labels(*kind_labels).inc(len(body))

        base_url = None
        if self.mode in ("forward", "forward-only") and self.forwarder is not None:
            base_url = vendor.upstream_base(route.upstream, self.settings)
        storing = self.mode != "forward-only" and self.store is not None

        stored = None
        if storing:
            try:
                decoded = decode_body(body, encoding, self.max_decoded_bytes)
            except UnsupportedEncoding as error:
                return self._reject(request, match, vendor.error(415, error.reason), "unsupported_encoding")
            except DecodedTooLarge as error:
                return self._reject(request, match, vendor.error(413, error.reason), "decoded_too_large")
            except (CorruptBody, EncodingError) as error:
                return self._reject(request, match, vendor.error(400, error.reason), "corrupt_body")
            self.metrics.decoded_bytes.labels(*kind_labels).inc(len(decoded))
            stored = self.store.append(self._header_fields(request, match, encoding, len(body)), decoded)

        if base_url is None:
            if stored is None:
                answer = vendor.error(502, f"no upstream is configured for {vendor.name}")
                return self._reject(request, match, answer, "no_upstream")
            stored.addCallbacks(
                lambda key: self._answer(request, match, route.success(decoded)),
                lambda failure: self._store_failed(request, match, failure),
            )
            return NOT_DONE_YET

        forwarded = self._forward(request, match, base_url, body)
        waiting = [forwarded] + ([stored] if stored is not None else [])
        results = defer.DeferredList(waiting, consumeErrors=True)
        results.addCallback(lambda outcomes: self._relay(request, match, outcomes))
        return NOT_DONE_YET

    def _forward(self, request, match: Match, base_url: str, body: bytes):
        vendor = match.vendor
        headers = request.requestHeaders
        if vendor.key_setting and vendor.key_header:
            key = self.settings.get(vendor.key_setting)
            if key is not None and not self._has_credential(request, match):
                headers = headers.copy()
                headers.setRawHeaders(vendor.key_header, [key.reveal().encode("utf-8")])
        display = storable_path(request.path.decode("latin-1"), match.route.path, match.route.credential_in_path)
        method = request.method
        return self.forwarder.forward(base_url, method, request.uri, headers, body if body or method != b"GET" else None, display)

    @staticmethod
    def _has_credential(request, match: Match) -> bool:
        vendor = match.vendor
        for name in vendor.credential_headers:
            if request.requestHeaders.hasHeader(name.encode("latin-1")):
                return True
        if match.route.credential_in_path:
            return True
        return any(name.decode("latin-1").lower() in vendor.credential_query for name in request.args)

    def _header_fields(self, request, match: Match, encoding: Optional[str], wire_size: int) -> dict:
        route, vendor = match.route, match.vendor
        content_type = request.getHeader(b"content-type")
        _, _, query = request.uri.partition(b"?")
        return {
            "vendor": vendor.name,
            "kind": route.kind,
            "route": route.name,
            "method": request.method.decode("latin-1"),
            "path": storable_path(request.path.decode("latin-1"), route.path, route.credential_in_path),
            "query": storable_query(query, vendor.credential_query),
            "content_type": content_type.decode("latin-1") if content_type is not None else None,
            "content_encoding": encoding,
            "wire_size": wire_size,
            "headers": storable_headers(request.requestHeaders, vendor.credential_headers),
        }

    def _relay(self, request, match: Match, outcomes) -> None:
        forwarded_ok, forwarded = outcomes[0]
        if len(outcomes) > 1:
            stored_ok, stored = outcomes[1]
            if stored_ok:
                self.metrics.stored_records.labels(match.vendor.name, match.route.kind).inc()
            else:
                self._log_store_failure(match, stored)
        if not forwarded_ok:
            if forwarded.check(UpstreamError):
                error = forwarded.value
                self.metrics.upstream_requests.labels(self._upstream_label(match), "error").inc()
                answer = match.vendor.error(error.status, error.reason)
                return self._reject(request, match, answer, "upstream_unavailable", deliver=True)
            self.log.failure("Forwarding failed unexpectedly", forwarded)
            return self._reject(request, match, match.vendor.error(502, "forwarding failed"), "forward_error", deliver=True)
        response: UpstreamResponse = forwarded
        self.metrics.upstream_requests.labels(self._upstream_label(match), f"{response.status // 100}xx").inc()
        latency = getattr(self.forwarder, "last_latency", None)
        if latency is not None:
            self.metrics.upstream_latency.labels(self._upstream_label(match)).observe(latency)
        self._write_response(request, match, response)

    def _upstream_label(self, match: Match) -> str:
        return f"{match.vendor.name}.{match.route.upstream}"

    def _write_response(self, request, match: Match, response: UpstreamResponse) -> None:
        if request._disconnected or request.finished:
            return
        request.setResponseCode(response.status, response.phrase or None)
        for name, values in end_to_end_headers(response.headers).getAllRawHeaders():
            request.responseHeaders.setRawHeaders(name, list(values))
        if response.status not in (204, 304) and not 100 <= response.status < 200:
            request.setHeader(b"content-length", str(len(response.body)).encode("ascii"))
        self.metrics.requests.labels(match.vendor.name, match.route.kind, match.route.name, str(response.status)).inc()
        if response.body and request.method != b"HEAD":
            request.write(response.body)
        request.finish()

    def _answer(self, request, match: Optional[Match], answer: Answer) -> None:
        if match is not None:
            self.metrics.stored_records.labels(match.vendor.name, match.route.kind).inc()
        self._write_answer(request, match, answer)

    def _write_answer(self, request, match: Optional[Match], answer: Answer) -> None:
        if request._disconnected or request.finished:
            return
        request.setResponseCode(answer.status)
        if answer.content_type is not None and answer.status != 204:
            request.setHeader(b"content-type", answer.content_type)
        for name, value in answer.headers.items():
            request.setHeader(name, value)
        labels = (match.vendor.name, match.route.kind, match.route.name) if match else ("none", "none", "none")
        self.metrics.requests.labels(*labels, str(answer.status)).inc()
        if answer.status == 204:
            request.finish()
            return
        request.setHeader(b"content-length", str(len(answer.body)).encode("ascii"))
        if request.method != b"HEAD":
            request.write(answer.body)
        request.finish()

    def _reject(self, request, match: Optional[Match], answer: Answer, reason: str, deliver: bool = False):
        """
        Answer an error, count it and log it (rate-limited per reason).
        """
        self.metrics.rejected.labels(reason).inc()
        where = f"{match.vendor.name}.{match.route.name}" if match else "unrouted"
        self._errors.emit(
            f"{reason}:{where}",
            LogLevel.warn,
            "Rejected {method} request on {route} with {status}: {reason}",
            method=request.method.decode("latin-1"),
            route=where,
            status=answer.status,
            reason=_reason_text(answer),
        )
        self._write_answer(request, match, answer)
        return NOT_DONE_YET

    def _store_failed(self, request, match: Match, failure: Failure) -> None:
        self._log_store_failure(match, failure)
        if failure.check(StoreFull):
            answer = match.vendor.error(503, "local store is full; retry later")
        else:
            answer = match.vendor.error(503, "local store is unavailable; retry later")
        answer = Answer(answer.status, answer.body, answer.content_type, {b"retry-after": b"30"})
        self._reject(request, match, answer, "store_unavailable")

    def _log_store_failure(self, match: Match, failure: Failure) -> None:
        if failure.check(StoreError):
            self._errors.emit(
                "store_failure",
                LogLevel.error,
                "Storing a {vendor} {kind} request failed: {error}",
                vendor=match.vendor.name,
                kind=match.route.kind,
                error=str(failure.value),
            )
        else:
            self.log.failure("Storing a request failed unexpectedly", failure)


def _reason_text(answer: Answer) -> str:
    text = answer.body.decode("utf-8", "replace")
    return text if len(text) <= 300 else text[:300] + "..."
