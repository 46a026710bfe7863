"""
The ingest resource: one twisted.web resource serving every vendor route.

For each request it finds the route (by path, never by C{Host}), checks the
method and the body size, decodes the body, parses it when the mode needs
the items, stores it, forwards it and responds to the client.  Which of those
happen depends on the proxy mode:

  - C{forward}: store and forward everything; the client gets the
    upstream's answer.
  - C{sample}: store everything; forward metrics, events and checks in
    full and a sample of logs and traces (L{reductrai.sampling}).  A
    request whose items are all dropped is not sent and the client gets
    the vendor's success answer.
  - C{store-only}: store; the client gets the vendor's success answer
    once the record is committed.
  - C{forward-only}: forward without decoding, parsing or storing.

A vendor without a configured upstream is served as in C{store-only} in
every mode but C{forward-only}.
"""

from __future__ import annotations

import time
from typing import Mapping, Optional
from urllib.parse import parse_qs

from twisted.internet import defer, threads
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from reductrai.credentials import end_to_end_headers, storable_headers, storable_path, storable_query
from reductrai.encoding import (
    OFFLOAD_BYTES,
    DecodedTooLarge,
    EncodingError,
    UnsupportedEncoding,
    decode_body,
    parse_content_encoding,
)
from reductrai.formats.items import PayloadContext, PayloadError
from reductrai.forward import Forwarder, UpstreamError, UpstreamResponse
from reductrai.metrics import Metrics
from reductrai.ratelimit import RateLimitedLog
from reductrai.store import RecordStore, StoreError, StoreFull
from reductrai.vendors.base import Answer, AnswerContext, Match, Router
from reductrai.vendors.registry import UNKNOWN_MATCH

SERVER = b"reductrai"


class IngestResource(Resource):
    """
    Serve every vendor route of a L{Router}.

    @ivar sampling: the L{reductrai.sampling.SamplingPolicy} of sample
        mode, or L{None}.
    @ivar sampling_counters: where sampling decisions are counted, or
        L{None}.
    @ivar index_items: parse payloads in forward mode too, so that stored
        records carry their items for the query API.
    @ivar spool: the L{reductrai.spool.Spool} that delivers forwarded
        requests the upstream did not accept, or L{None}.
    @ivar spool_on_failure: C{"spool"} sends the vendor's success response
        when the spool contains the request; C{"relay"} passes the upstream's
        failure to the client (the spool still retries).
    @ivar offload_decode_bytes: encoded bodies of at least this many bytes
        (as received) are decoded in a thread; C{0} decodes every body on
        the reactor thread.
    @ivar run_in_thread: called as C{run_in_thread(f, *args)} to run such
        a decoding, returning a L{Deferred} of the result; L{None} uses the
        reactor's thread pool.
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
        sampling=None,
        sampling_counters=None,
        index_items: bool = True,
        spool=None,
        spool_on_failure: str = "spool",
        offload_decode_bytes: int = OFFLOAD_BYTES,
        run_in_thread=None,
    ) -> None:
        super().__init__()
        self.router = router
        self.settings = settings
        self.mode = mode
        self.store = store
        self.forwarder = forwarder
        self.metrics = metrics
        self.sampling = sampling
        self.sampling_counters = sampling_counters
        self.index_items = index_items
        self.spool = spool
        self.spool_on_failure = spool_on_failure
        self.max_decoded_bytes = int(settings["limits.max_decoded_bytes"])
        self.offload_decode_bytes = offload_decode_bytes
        self.run_in_thread = run_in_thread
        self.in_flight = 0
        self._idle_waiters: list = []
        self._errors = RateLimitedLog(self.log)

    # -- request flow ------------------------------------------------------

    def render(self, request):
        self.in_flight += 1
        request.notifyFinish().addBoth(self._request_done)
        return self._render(request)

    def _request_done(self, result) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.called:
                    waiter.callback(True)

    def wait_idle(self, reactor, timeout: float) -> "defer.Deferred[bool]":
        """
        Wait until no request is in flight, at most C{timeout} seconds.

        @return: a L{Deferred} firing with C{True} once idle, or C{False}
            when the timeout passed first.
        """
        if self.in_flight == 0:
            return defer.succeed(True)
        waiter: defer.Deferred = defer.Deferred()
        self._idle_waiters.append(waiter)
        call = reactor.callLater(timeout, lambda: waiter.called or waiter.callback(False))
        waiter.addBoth(lambda idle: (call.active() and call.cancel(), idle)[1])
        return waiter

    def _render(self, request):
        request.setHeader(b"server", SERVER)
        path = request.path.decode("latin-1")
        content_type_header = request.getHeader(b"content-type")
        content_type = content_type_header.decode("latin-1") if content_type_header is not None else None
        match = self.router.match(path, content_type) or UNKNOWN_MATCH
        route, vendor = match.route, match.vendor

        if request.method not in route.methods:
            allowed = b", ".join(sorted(route.methods))
            request.setHeader(b"allow", allowed)
            reason = f"method {request.method.decode('latin-1')} is not allowed on {route.path}; allowed: {allowed.decode()}"
            return self._reject(request, match, vendor.error(405, reason), "method_not_allowed")

        if request.too_large:
            request.setHeader(b"connection", b"close")
            request.channel.persistent = False
            limit = request.channel.site.max_body_bytes
            answer = vendor.error(413, f"request body exceeds the limit of {limit} bytes")
            return self._reject(request, match, answer, "body_too_large")

        body = request.content.getvalue()
        self.metrics.child(self.metrics.received_bytes, vendor.name, route.kind).inc(len(body))
        base_url = None
        if self.forwarder is not None and self.mode != "store-only":
            base_url = vendor.upstream_base(route.upstream, self.settings)

        if self.mode == "forward-only" or self.store is None:
            if base_url is None:
                answer = vendor.error(502, f"no upstream is configured for {vendor.name}")
                return self._reject(request, match, answer, "no_upstream")
            forwarded = self._forward(request, match, base_url, body)
            forwarded.addBoth(lambda outcome: self._relay(request, match, outcome, None))
            return NOT_DONE_YET

        encoding_header = request.getHeader(b"content-encoding")
        encoding = encoding_header.decode("latin-1") if encoding_header is not None else None
        context = self._answer_context(request, match, path, content_type)
        if vendor.check is not None:
            refused = vendor.check(context)
            if refused is not None:
                return self._reject(request, match, refused, "vendor_check")

        if len(body) >= self.offload_decode_bytes > 0 and parse_content_encoding(encoding):
            # A large encoded body is decoded in a thread (zlib, zstd,
            # snappy and the others release the GIL), so the reactor thread
            # serves other requests meanwhile.
            decoding = self._run_in_thread(decode_body, body, encoding, self.max_decoded_bytes)
            decoding.addCallbacks(
                lambda decoded: self._ingest(request, match, body, base_url, encoding, context, decoded),
                lambda failure: self._decode_failed(request, match, context, failure),
            )
            decoding.addErrback(self._ingest_failed, request, match)
            return NOT_DONE_YET
        try:
            decoded = decode_body(body, encoding, self.max_decoded_bytes)
        except EncodingError as error:
            return self._reject_encoding(request, match, context, error)
        return self._ingest(request, match, body, base_url, encoding, context, decoded)

    def _run_in_thread(self, f, *args) -> defer.Deferred:
        """
        Run C{f(*args)} in the reactor's thread pool.

        @return: a L{Deferred} of its result.
        """
        if self.run_in_thread is not None:
            return self.run_in_thread(f, *args)
        return threads.deferToThread(f, *args)

    def _reject_encoding(self, request, match: Match, context, error: EncodingError):
        """
        Reject a body that could not be decoded: 415 for an unsupported
        encoding, 413 for a decoded body over the cap, 400 otherwise.
        """
        vendor = match.vendor
        if isinstance(error, UnsupportedEncoding):
            return self._reject(request, match, vendor.error(415, error.reason, context), "unsupported_encoding")
        if isinstance(error, DecodedTooLarge):
            return self._reject(request, match, vendor.error(413, error.reason, context), "decoded_too_large")
        return self._reject(request, match, vendor.error(400, error.reason, context), "corrupt_body")

    def _decode_failed(self, request, match: Match, context, failure: Failure):
        """
        Reject a body whose decoding in a thread failed, or pass on an
        unexpected failure.
        """
        if failure.check(EncodingError):
            return self._reject_encoding(request, match, context, failure.value)
        return failure

    def _ingest_failed(self, failure: Failure, request, match: Match) -> None:
        """
        Log an unexpected error raised while handling a request whose body
        was decoded in a thread, and respond 500 as twisted.web does for an
        error raised by C{render}.
        """
        self.log.failure("Handling a {vendor} request failed", failure, vendor=match.vendor.name)
        if not request.finished and not request._disconnected:
            self._reject(request, match, match.vendor.error(500, "internal error"), "internal_error")

    def _ingest(self, request, match: Match, body: bytes, base_url, encoding, context, decoded: bytes):
        """
        Parse, store and forward a request whose body is decoded.

        @return: L{NOT_DONE_YET}, because every path writes its response later.
        """
        route, vendor = match.route, match.vendor
        self.metrics.child(self.metrics.decoded_bytes, vendor.name, route.kind).inc(len(decoded))
        context.body = decoded

        # The vendor judges the payloads it receives in forward mode.  In
        # every other mode reductrai responds in its place, so it must
        # reject what the vendor would reject.
        answering_for_vendor = base_url is None or self.mode == "sample"
        parsed = None
        if route.parser is not None and (answering_for_vendor or self.index_items):
            try:
                parsed = context.parsed
            except PayloadError as error:
                self.metrics.child(self.metrics.rejected, "invalid_payload").inc()
                if answering_for_vendor:
                    return self._reject(request, match, vendor.error(400, error.reason, context), "invalid_payload")
            except Exception:
                self.log.failure("Parser of {vendor}.{route} failed", vendor=vendor.name, route=route.name)
                if answering_for_vendor:
                    return self._reject(request, match, vendor.error(400, "invalid payload", context), "invalid_payload")

        fields = self._header_fields(request, match, encoding, len(body))
        items = parsed.items if parsed is not None else None
        if base_url is None:
            stored = self.store.append(fields, decoded, items=items)
            stored.addCallbacks(
                lambda key: self._answer_success(request, match, context),
                lambda failure: self._store_failed(request, match, failure),
            )
            return NOT_DONE_YET

        forward_body: Optional[bytes] = body
        thinned = False
        if self.mode == "sample" and self.sampling is not None:
            decision = self.sampling.decide(vendor.name, route.kind, parsed)
            forward_body, thinned = self._sample(match, context, body, decoded, encoding, parsed, decision)
        if forward_body is None:
            stored = self.store.append(fields, decoded, items=items)
            stored.addCallbacks(
                lambda key: self._answer_success(request, match, context),
                lambda failure: self._store_failed(request, match, failure),
            )
            return NOT_DONE_YET

        headers = self._forward_headers(request, match)
        entry_id = None
        extra = None
        if self.spool is not None:
            if self.spool.is_full():
                answer = vendor.error(503, "the delivery spool is full; retry later", context)
                answer = Answer(answer.status, answer.body, answer.content_type, {**answer.headers, b"retry-after": b"30"})
                return self._reject(request, match, answer, "spool_full")
            display = fields["path"] + ("?" + fields["query"] if fields["query"] else "")
            entry_id, extra = self.spool.entry_ops(base_url, request.method, request.uri, headers, forward_body, display)
        stored = self.store.append(fields, decoded, items=items, extra=extra)
        if entry_id is not None:
            stored.addErrback(self._abandon_entry, entry_id)
            if self.spool_on_failure == "spool" and self.spool.upstream_is_down(base_url):
                # The upstream's circuit is open: a live attempt would only
                # wait for the failure, so the drain loop takes the request.
                stored.addCallbacks(
                    lambda key: self._queue_without_forwarding(request, match, context, entry_id),
                    lambda failure: self._store_failed(request, match, failure),
                )
                return NOT_DONE_YET

        forwarded = self._forward(request, match, base_url, forward_body, headers)
        results = defer.DeferredList([forwarded, stored], consumeErrors=True)
        results.addCallback(
            lambda outcomes: self._relay(
                request, match, outcomes[0], outcomes[1], context if thinned else None, entry_id, context,
            )
        )
        return NOT_DONE_YET

    def _queue_without_forwarding(self, request, match: Match, context, entry_id: bytes) -> None:
        self.metrics.child(self.metrics.stored_records, match.vendor.name, match.route.kind).inc()
        self.spool.release(entry_id)
        self._answer_queued(request, match, context)

    def _abandon_entry(self, failure: Failure, entry_id: bytes) -> Failure:
        self.spool.abandon(entry_id)
        return failure

    def _answer_context(self, request, match: Match, path: str, content_type: Optional[str]) -> AnswerContext:
        headers = {
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        _, _, query_bytes = request.uri.partition(b"?")
        query = parse_qs(query_bytes.decode("latin-1"), keep_blank_values=True)
        secret = match.vendor.credential_headers
        payload_context = PayloadContext(
            path=path,
            content_type=content_type,
            query=query,
            headers={name: value for name, value in headers.items() if name not in secret},
        )
        context = AnswerContext(b"", content_type, headers, query, path)
        parser = match.route.parser
        if parser is not None:
            context._parse = lambda: parser(context.body, payload_context)
        context.payload_context = payload_context
        return context

    def _sample(self, match: Match, context, body: bytes, decoded: bytes, encoding, parsed, decision):
        """
        Apply a sampling decision.

        @return: C{(body to forward or None when nothing is sent, whether
            it was thinned)}.
        """
        from reductrai.sampling import UnsupportedPayload, reencode, thin_payload

        vendor, route = match.vendor, match.route
        forward_body: Optional[bytes] = body
        forwarded_decoded = len(decoded)
        thinned = False
        if not decision.forward_request:
            forward_body = None
            forwarded_decoded = 0
        elif not decision.keeps_all and parsed is not None:
            try:
                kept = thin_payload(
                    vendor.name, route.name, context.payload_context, decoded, parsed,
                    decision.keep_indexes, decision.rates,
                )
            except (UnsupportedPayload, PayloadError) as error:
                self._errors.emit(
                    f"thin:{vendor.name}.{route.name}", LogLevel.warn,
                    "Cannot thin a {vendor} {route} payload, forwarding it whole: {error}",
                    vendor=vendor.name, route=route.name, error=str(error),
                )
            else:
                if kept is None:
                    forward_body = None
                    forwarded_decoded = 0
                elif kept is not decoded:
                    forward_body = reencode(kept, encoding)
                    forwarded_decoded = len(kept)
                    thinned = True
        if self.sampling_counters is not None:
            self.sampling_counters.record(
                vendor.name, decision, len(decoded), forwarded_bytes=forwarded_decoded, wire_bytes=len(body),
            )
        return forward_body, thinned

    def _forward_headers(self, request, match: Match):
        """
        Return the request headers to forward: the client's, plus the
        configured API key of the vendor when the request carries none.
        """
        vendor = match.vendor
        headers = request.requestHeaders
        if vendor.key_setting and vendor.key_header:
            key = self.settings.get(vendor.key_setting)
            if key is not None and not self._has_credential(request, match):
                headers = headers.copy()
                headers.setRawHeaders(vendor.key_header, [key.reveal().encode("utf-8")])
        return headers

    def _forward(self, request, match: Match, base_url: str, body: bytes, headers=None):
        if headers is None:
            headers = self._forward_headers(request, match)
        display = storable_path(request.path.decode("latin-1"), match.route.path, match.route.credential_in_path)
        method = request.method
        payload = body if body or method not in (b"GET", b"HEAD") else None
        return self.forwarder.forward(base_url, method, request.uri, headers, payload, display)

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

    # -- answers -----------------------------------------------------------

    def _relay(
        self, request, match: Match, forwarded, stored, own_answer_context=None, entry_id=None, context=None,
    ) -> None:
        """
        Answer once the record is committed and the upstream has answered.

        The client gets the upstream's response, with three exceptions.  A
        thinned request that the upstream accepted gets the vendor's answer
        to the full request.  A request the spool now holds (upstream
        unreachable, 408, 429 or 5xx, committed locally) gets the vendor's
        success answer with C{X-Reductrai-Queued: true}, when
        C{spool.on_upstream_failure} is C{spool}.
        """
        stored_ok = True
        if stored is not None:
            stored_ok, stored_result = stored
            if stored_ok:
                self.metrics.child(self.metrics.stored_records, match.vendor.name, match.route.kind).inc()
            else:
                self._log_store_failure(match, stored_result)
        if isinstance(forwarded, tuple):
            forwarded_ok, outcome = forwarded
        else:
            forwarded_ok, outcome = not isinstance(forwarded, Failure), forwarded
        label = f"{match.vendor.name}.{match.route.upstream}"

        upstream_accepted = forwarded_ok and 200 <= outcome.status < 300
        if not stored_ok and not upstream_accepted:
            # Neither the store nor the upstream has the request: the
            # client must send it again.
            full = stored_result.check(StoreFull)
            reason = "local store is full; retry later" if full else "local store is unavailable; retry later"
            answer = match.vendor.error(503, reason)
            answer = Answer(answer.status, answer.body, answer.content_type, {**answer.headers, b"retry-after": b"30"})
            return self._reject(request, match, answer, "store_full" if full else "store_unavailable")

        status: Optional[int] = None
        retry_after = None
        if forwarded_ok:
            status = outcome.status
            retry_after = _retry_after(outcome.headers)
        if entry_id is not None and stored_ok:
            self.spool.settle(entry_id, status, retry_after)
        queued = (
            entry_id is not None
            and stored_ok
            and self.spool_on_failure == "spool"
            and (status is None or status in (408, 429) or status >= 500)
        )

        if not forwarded_ok:
            if outcome.check(UpstreamError):
                self.metrics.child(self.metrics.upstream_requests, label, "error").inc()
                if queued:
                    return self._answer_queued(request, match, context)
                answer = match.vendor.error(outcome.value.status, outcome.value.reason)
                return self._reject(request, match, answer, "upstream_unavailable")
            self.log.failure("Forwarding failed unexpectedly", outcome)
            if queued:
                return self._answer_queued(request, match, context)
            return self._reject(request, match, match.vendor.error(502, "forwarding failed"), "forward_error")
        response: UpstreamResponse = outcome
        self.metrics.child(self.metrics.upstream_requests, label, f"{response.status // 100}xx").inc()
        latency = getattr(self.forwarder, "last_latency", None)
        if latency is not None:
            self.metrics.child(self.metrics.upstream_latency, label).observe(latency)
        if queued:
            return self._answer_queued(request, match, context)
        if own_answer_context is not None and 200 <= response.status < 300:
            return self._write_answer(request, match, match.route.success(own_answer_context.body, own_answer_context))
        self._write_response(request, match, response)

    def _answer_queued(self, request, match: Match, context) -> None:
        """
        Answer the vendor's success for a request the spool will deliver.
        """
        self.metrics.child(self.metrics.rejected, "queued_for_retry").inc()
        try:
            answer = match.route.success(context.body, context)
        except Exception:
            self.log.failure("Building the {vendor} success response failed", vendor=match.vendor.name)
            answer = Answer(202, b"{}")
        headers = {**answer.headers, b"x-reductrai-queued": b"true"}
        self._write_answer(request, match, Answer(answer.status, answer.body, answer.content_type, headers))

    def _write_response(self, request, match: Match, response: UpstreamResponse) -> None:
        if request._disconnected or request.finished:
            return
        request.setResponseCode(response.status, response.phrase or None)
        for name, values in end_to_end_headers(response.headers).getAllRawHeaders():
            request.responseHeaders.setRawHeaders(name, list(values))
        if response.status not in (204, 304) and not 100 <= response.status < 200:
            request.setHeader(b"content-length", str(len(response.body)).encode("ascii"))
        self.metrics.child(self.metrics.requests, match.vendor.name, match.route.kind, match.route.name, str(response.status)).inc()
        if response.body and request.method != b"HEAD":
            request.write(response.body)
        request.finish()

    def _answer_success(self, request, match: Match, context: AnswerContext) -> None:
        self.metrics.child(self.metrics.stored_records, match.vendor.name, match.route.kind).inc()
        try:
            answer = match.route.success(context.body, context)
        except Exception:
            self.log.failure("Building the {vendor} success response failed", vendor=match.vendor.name)
            answer = match.vendor.error(500, "internal error while building the answer", context)
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
        self.metrics.child(self.metrics.requests, *labels, str(answer.status)).inc()
        if answer.status == 204:
            request.finish()
            return
        request.setHeader(b"content-length", str(len(answer.body)).encode("ascii"))
        if request.method != b"HEAD":
            request.write(answer.body)
        request.finish()

    def _reject(self, request, match: Optional[Match], answer: Answer, reason: str):
        """
        Answer an error, count it and log it (rate-limited per reason).
        """
        self.metrics.child(self.metrics.rejected, reason).inc()
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
        answer = Answer(answer.status, answer.body, answer.content_type, {**answer.headers, b"retry-after": b"30"})
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


def _retry_after(headers) -> Optional[float]:
    from reductrai.spool import parse_retry_after

    values = headers.getRawHeaders(b"retry-after")
    if not values:
        return None
    return parse_retry_after(values[0].decode("latin-1"), time.time())


def _reason_text(answer: Answer) -> str:
    text = answer.body.decode("utf-8", "replace")
    return text if len(text) <= 300 else text[:300] + "..."
