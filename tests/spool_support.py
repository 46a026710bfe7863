"""
Parts shared by the spool tests: a store on a temporary directory, a
scripted forwarder, and a fault-injecting upstream on 127.0.0.1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import attrs
from twisted.internet import defer, protocol, reactor
from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from reductrai.forward import UpstreamError, UpstreamResponse
from reductrai.store import RecordStore, StoreOptions

UPSTREAM = "http://127.0.0.1:9"


def open_store(path: Path, clock) -> RecordStore:
    extra = {"use_dictionaries": False} if "use_dictionaries" in attrs.fields_dict(StoreOptions) else {}
    store = RecordStore(StoreOptions(path=str(path), map_size=64 << 20, durability="none", **extra), clock)
    store.open()
    return store


def header_fields(method: bytes = b"POST", path: str = "/api/v2/series") -> dict:
    return {
        "vendor": "datadog",
        "kind": "metrics",
        "route": "series_v2",
        "method": method.decode(),
        "path": path,
        "query": "",
        "content_type": "application/json",
        "content_encoding": None,
        "wire_size": 0,
        "headers": [],
    }


def accept(spool, store, number: int, base: str = UPSTREAM, key: bytes = b"k" * 32, body: Optional[bytes] = None) -> tuple[bytes, Deferred]:
    """
    Do what the ingest resource does for one request: build the entry and
    append the record with it.  The request carries its number in
    C{X-Seq} and an API key in C{DD-API-KEY}.
    """
    headers = Headers({b"content-type": [b"application/json"], b"dd-api-key": [key], b"x-seq": [str(number).encode()]})
    body = body if body is not None else b'{"n": %d}' % number
    entry_id, ops = spool.entry_ops(base, b"POST", b"/api/v2/series?n=%d" % number, headers, body)
    return entry_id, store.append(header_fields(), body, extra=ops)


@attrs.define
class Call:
    base: str
    method: bytes
    target: bytes
    headers: Headers
    body: Optional[bytes]
    deferred: Deferred

    @property
    def seq(self) -> int:
        return int(self.headers.getRawHeaders(b"x-seq")[0])


class ScriptedForwarder:
    """
    A forwarder whose answers the test gives: C{answer} returns a status,
    an exception or L{None} to leave the call pending.
    """

    def __init__(self, answer: Callable[[Call], object] = lambda call: 202) -> None:
        self.calls: list[Call] = []
        self.answer = answer
        self.in_flight = 0
        self.max_in_flight = 0

    def forward(self, base_url, method, target, headers, body, display_path=""):
        d: Deferred = Deferred()
        call = Call(base_url, method, target, headers, body, d)
        self.calls.append(call)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

        def done(result):
            self.in_flight -= 1
            return result

        d.addBoth(done)
        outcome = self.answer(call)
        if outcome is not None:
            self.reply(call, outcome)
        return d

    @staticmethod
    def reply(call: Call, outcome, headers: Optional[dict] = None) -> None:
        if isinstance(outcome, Exception):
            call.deferred.errback(outcome)
        else:
            call.deferred.callback(UpstreamResponse(outcome, b"", Headers(headers or {}), b"{}"))


def unreachable() -> UpstreamError:
    return UpstreamError(502, "upstream refused the connection")


class FaultResource(Resource):
    """
    An upstream whose behaviour the test switches: C{ok}, C{slow} (answers
    after C{delay}), C{reset} (sends part of a body, then aborts the
    connection), C{500}, C{429} (with C{Retry-After}), C{403}.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"
        self.delay = 5.0
        self.retry_after = b"1"
        self.received: list[tuple[float, bytes, Headers, bytes]] = []
        self.answered: list[tuple[float, int]] = []
        self.delivered: list[int] = []

    def render(self, request):
        self.received.append((reactor.seconds(), request.uri, request.requestHeaders.copy(), request.content.read()))
        mode = self.mode
        if mode == "reset":
            request.setResponseCode(200)
            request.setHeader(b"content-length", b"100")
            request.write(b"partial")
            reactor.callLater(0, request.transport.abortConnection)
            return NOT_DONE_YET
        if mode == "slow":
            call = reactor.callLater(self.delay, self._finish, request, 202)
            request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
            return NOT_DONE_YET
        status = {"ok": 202, "500": 500, "429": 429, "403": 403}[mode]
        if status == 429:
            request.setHeader(b"retry-after", self.retry_after)
        self._finish(request, status)
        return NOT_DONE_YET

    def _finish(self, request, status: int) -> None:
        self.answered.append((reactor.seconds(), status))
        if 200 <= status <= 299:
            seq = request.requestHeaders.getRawHeaders(b"x-seq")
            self.delivered.append(int(seq[0]) if seq else -1)
        request.setResponseCode(status)
        request.setHeader(b"content-length", b"2")
        request.write(b"{}")
        request.finish()


class _Refuser(protocol.Protocol):
    def connectionMade(self):
        self.transport.abortConnection()


class FaultUpstream:
    """
    A fault-injecting upstream on a fixed 127.0.0.1 port that can go
    C{down} (port closed) and come back, or C{refuse} (accept, then
    reset at once).
    """

    def __init__(self) -> None:
        self.resource = FaultResource()
        self.site = Site(self.resource)
        self.site.noisy = False
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.port_number = self.port.getHost().port
        self.url = f"http://127.0.0.1:{self.port_number}"

    def set_mode(self, mode: str) -> None:
        self.resource.mode = mode

    def received_seqs(self) -> list[int]:
        return [int(headers.getRawHeaders(b"x-seq")[0]) for _, _, headers, _ in self.resource.received]

    def delivered_seqs(self) -> list[int]:
        """
        Sequence numbers of requests the upstream answered 2xx to.
        """
        return list(self.resource.delivered)

    async def down(self) -> None:
        await defer.maybeDeferred(self.port.stopListening)

    def up(self, factory=None) -> None:
        self.port = reactor.listenTCP(self.port_number, factory or self.site, interface="127.0.0.1")

    async def refuse(self) -> None:
        await self.down()
        self.up(protocol.Factory.forProtocol(_Refuser))

    async def restore(self) -> None:
        await self.down()
        self.up()

    async def stop(self) -> None:
        await defer.maybeDeferred(self.port.stopListening)
