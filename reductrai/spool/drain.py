"""
The durable spool: every forwarded request is kept in LMDB until its
upstream has accepted it.

Contract with the ingest resource:

  1. Before storing a request, the resource asks L{Spool.entry_ops} for
     the entry's operations and passes them to
     C{RecordStore.append(..., extra=ops)}, so that the record and its
     delivery entry commit in one transaction.  From then on the request
     is delivered at least once, unless it becomes a dead letter or is
     dropped by C{when_full="drop_oldest"}.
  2. The resource forwards the request itself (the live forward) and
     reports the outcome with L{Spool.settle}.  During C{live_grace}
     seconds the drain loop leaves the entry alone, so that the live
     forward and the drain loop do not both send it.
  3. The drain loop sends whatever is left: per upstream in arrival
     order, with backoff, a circuit breaker, bounded concurrency and a
     rate limit, reading LMDB in bounded batches.

After a restart nothing is live: every pending entry is eligible at once.

With several worker processes (C{server.workers}), every worker accepts,
spools and forwards live, but only worker 0 drains (C{drains=True}).  An
entry id carries the id of the worker that created it
(L{reductrai.spool.entries.entry_worker}); worker 0 knows only its own
live entries, so it leaves an entry of another worker alone until
C{live_grace} seconds (the upstream timeout plus a margin) have passed
since the entry's creation time: by then that worker's live forward has
ended, successfully (the entry is deleted) or not (the entry is left to
the drain loop).  An entry is thus never lost, and in the normal path
never sent twice; an entry whose worker died, or whose live forward
failed, waits for the rest of its grace before worker 0 sends it.
"""

from __future__ import annotations

import collections
import random
import time
from typing import Callable, Iterable, Optional

import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from reductrai.credentials import COMMON_CREDENTIAL_HEADERS, end_to_end_headers, storable_headers, storable_query
from reductrai.forward import UpstreamError, UpstreamResponse
from reductrai.keybox import KeyBox, KeyBoxError
from reductrai.ratelimit import RateLimitedLog
from reductrai.spool.entries import (
    BODY_DB,
    DEAD_BODY_DB,
    DEAD_DB,
    SPOOL_DB,
    UPSTREAM_ID_SIZE,
    BodyCodec,
    EntryError,
    EntryMeta,
    decode_credentials,
    decode_entry,
    encode_credentials,
    encode_entry,
    entry_id_to_text,
    entry_time_ns,
    entry_worker,
    make_entry_id,
    upstream_id,
)
from reductrai.spool.options import SpoolOptions
from reductrai.spool.policy import CLOSED, HALF_OPEN, OPEN, Circuit, TokenBucket, parse_retry_after, retryable_status

#: Header names (lower-case) that carry credentials at one vendor or
#: another; dead letters keep every other header.
CREDENTIAL_HEADERS = COMMON_CREDENTIAL_HEADERS | frozenset(
    {
        "dd-api-key",
        "dd-application-key",
        "x-datadog-api-key",
        "x-license-key",
        "x-insert-key",
        "license-key",
        "x-api-key",
        "api-key",
        "x-sf-token",
        "x-honeycomb-team",
        "x-scope-orgid",
        "splunk",
    }
)

#: Query parameter names (lower-case) that carry credentials.
CREDENTIAL_QUERY = frozenset(
    {"api_key", "application_key", "dd-api-key", "license_key", "x-license-key", "api-key", "apikey", "token"}
)

_MAX_DROPS_PER_ENTRY = 1000
_MAX_BATCHES_PER_PUMP = 4


#: Seconds between two reads of the spool's size for the full check: a
#: read transaction per request would cost more than the request itself.
USAGE_CHECK_INTERVAL = 0.1


class SpoolClosed(Exception):
    """
    The spool is used before L{Spool.start} or after L{Spool.stop}.
    """


@attrs.define(eq=False)
class _Upstream:
    """
    Drain state of one upstream.
    """

    id: bytes
    base: str
    circuit: Circuit
    bucket: TokenBucket
    in_flight: int = 0
    buffer: collections.deque = attrs.field(factory=collections.deque)
    position: Optional[bytes] = None


@attrs.define
class SpoolCounters:
    """
    Monotonic counters since the process started.
    """

    delivered: int = 0
    delivered_live: int = 0
    retries: int = 0
    dead_lettered: int = 0
    dropped_oldest: int = 0
    rejected_by_upstream: int = 0
    batches_read: int = 0
    entries_read: int = 0
    largest_batch: int = 0


class Spool:
    """
    Deliver every spooled request to its upstream at least once.

    @ivar counters: the L{SpoolCounters}.
    """

    log = Logger()

    def __init__(
        self,
        store,
        forwarder,
        reactor,
        options: SpoolOptions,
        keybox: KeyBox,
        clock_ns: Optional[Callable[[], int]] = None,
        rng: Callable[[], float] = random.random,
        add_credentials: Optional[Callable[[str, Headers], None]] = None,
        worker: int = 0,
        drains: bool = True,
    ) -> None:
        """
        @param store: an open-able L{reductrai.store.RecordStore}; it must be
            open before L{start} and closed only after L{stop} has fired.
        @param forwarder: a L{reductrai.forward.Forwarder}.
        @param clock_ns: wall clock in nanoseconds for entry ids and ages
            (default L{time.time_ns}).
        @param rng: uniform M{[0, 1)} source for the backoff jitter.
        @param add_credentials: called with the upstream base URL and the
            headers of an entry that has no sealed credentials (a dead
            letter sent again) to add the configured ones.
        @param worker: the id of this worker process, put in every entry id
            it creates.
        @param drains: whether this process runs the drain loop; the other
            workers of a shared store only accept, forward live and settle,
            and worker 0 drains what they leave (see the module docstring).
        """
        self.worker = worker
        self.drains = drains
        self.store = store
        self.forwarder = forwarder
        self.reactor = reactor
        self.options = options
        self.keybox = keybox
        self._clock_ns = clock_ns or time.time_ns
        self._rng = rng
        self._add_credentials = add_credentials
        self._codec = BodyCodec()
        self._upstreams: dict[bytes, _Upstream] = {}
        # Entry id -> end of its grace, in creation order; only the deadline
        # is kept, so a slow upstream costs little memory per live entry.
        self._live: "collections.OrderedDict[bytes, float]" = collections.OrderedDict()
        self._sending: dict[bytes, Deferred] = {}
        self._dropping: set[bytes] = set()
        self._committing: dict[bytes, int] = {}
        self._discovered_at = 0.0
        self._last_ns = 0
        self._sequence = 0
        self._running = False
        self._timer = None
        self._timer_at = 0.0
        self._stopping: Optional[Deferred] = None
        self._full = False
        self._usage_checked_at = float("-inf")
        self._errors = RateLimitedLog(self.log, clock=reactor.seconds)
        self.counters = SpoolCounters()

    # The accept path

    def entry_ops(
        self,
        upstream_base: str,
        method: bytes,
        target: bytes,
        headers: Headers,
        wire_body: bytes,
        display_target: Optional[str] = None,
    ) -> tuple[bytes, list]:
        """
        Build the delivery entry of one request.

        The exact C{target} and the end-to-end C{headers} (credentials
        included) are sealed with the key box; the wire body is stored as
        received.  The entry is live for C{live_grace} seconds: the drain
        loop does not send it until L{settle} reports a failure or the
        grace ends.

        @param upstream_base: the base URL the request is forwarded to.
        @param target: the client's raw request-target, query included.
        @param display_target: the target with credentials removed, shown
            by C{reductrai-inspect} and kept by dead letters (the
            resource's C{storable_path} plus C{storable_query}); by default
            the path with credential query parameters removed.
        @return: C{(entry_id, ops)}; C{ops} go into
            C{store.append(..., extra=ops)}.  When C{when_full} is
            C{"drop_oldest"} and the spool is full, the oldest entries are
            deleted in a separate commit and counted.
        """
        up = self._upstream_for(upstream_base)
        entry_id = self._new_id(up.id)
        if display_target is None:
            path, _, query = target.partition(b"?")
            display_target = path.decode("latin-1")
            if query:
                display_target += "?" + storable_query(query, CREDENTIAL_QUERY)
        header_list = [
            (name, value)
            for name, values in end_to_end_headers(headers).getAllRawHeaders()
            for value in values
        ]
        sealed = self.keybox.seal(encode_credentials(target, header_list), entry_id)
        meta = EntryMeta(
            upstream=upstream_base,
            method=method.decode("latin-1"),
            display=display_target,
            created_ns=entry_time_ns(entry_id),
            body_size=len(wire_body),
        )
        value = encode_entry(meta, sealed)
        body = self._codec.encode(wire_body)
        deadline = self.reactor.seconds() + self.options.live_grace
        if not self.drains:
            # No drain loop expires live entries here; one whose settle never
            # came must not stay in memory.
            self._expire_live(deadline - self.options.live_grace)
        self._live[entry_id] = deadline
        # Not before the store's group commit at the end of this turn.
        self._wake(max(deadline, self.reactor.seconds() + 0.001))
        if self.options.when_full == "drop_oldest" and self._running:
            self._make_room(len(value) + len(body))
        return entry_id, [("put", SPOOL_DB, entry_id, value), ("put", BODY_DB, entry_id, body)]

    def upstream_is_down(self, upstream_base: str) -> bool:
        """
        Whether the circuit of an upstream is open: a live forward would
        only wait for the failure, so the accept path leaves the request
        to the drain loop, which probes the upstream.
        """
        circuit = self._upstream_for(upstream_base).circuit
        if self.drains or circuit.state == CLOSED:
            return circuit.state == OPEN
        # Without a drain loop here, a live forward is the probe once the
        # open delay has passed; its settle closes or reopens the circuit.
        if circuit.allows(self.reactor.seconds()):
            circuit.sending()
            return False
        return True

    def release(self, entry_id: bytes) -> None:
        """
        Hand a committed entry to the drain loop at once, without a live
        forward and without counting an attempt.
        """
        self._live.pop(entry_id, None)
        self._kick()

    def abandon(self, entry_id: bytes) -> None:
        """
        Forget an entry whose record could not be committed (the append
        failed): it was never accepted, so it is not delivered.
        """
        self._live.pop(entry_id, None)
        up = self._upstreams.get(entry_id[:UPSTREAM_ID_SIZE])
        if up is not None and not self.drains:
            up.circuit.aborted()

    def settle(self, entry_id: bytes, status: Optional[int], retry_after: Optional[float] = None) -> None:
        """
        Report the outcome of the live forward of an entry.

        @param status: the upstream's status, or L{None} when it could not
            be reached or timed out.  2xx deletes the entry (credentials
            included); L{None}, 408, 429 and 5xx leave it to the drain
            loop, counted as one attempt, and delay the upstream by the
            backoff or C{retry_after}; any other status deletes it without
            retry, because the client got the upstream's answer.
        @param retry_after: seconds from the upstream's C{Retry-After}
            (see L{parse_retry_after}).
        """
        self._live.pop(entry_id, None)
        up = self._upstreams.get(entry_id[:UPSTREAM_ID_SIZE])
        if status is not None and 200 <= status <= 299:
            self.counters.delivered += 1
            self.counters.delivered_live += 1
            self._submit(self._delete_ops(entry_id), "delete a delivered entry")
            if up is not None:
                self._circuit_succeeded(up)
            return
        if retryable_status(status):
            self._count_live_attempt(entry_id, status)
            if up is not None:
                self._circuit_failed(up, status, retry_after, "live forward")
                self._rewind(up)
            self._kick()
            return
        self.counters.rejected_by_upstream += 1
        self._submit(self._delete_ops(entry_id), "delete a rejected entry")

    def _count_live_attempt(self, entry_id: bytes, status: Optional[int]) -> None:
        """
        Store the failed live forward as the entry's first attempt.  An
        entry not committed yet (its append is still pending) keeps 0.
        """
        if self.store.env is None:
            return
        spool_db = self.store.database(SPOOL_DB)
        with self.store.env.begin(buffers=False) as txn:
            value = txn.get(entry_id, db=spool_db)
        if value is None:
            return
        try:
            meta, sealed = decode_entry(value)
        except EntryError:
            return
        meta = attrs.evolve(meta, attempts=meta.attempts + 1, status=status)
        self._submit([("put", SPOOL_DB, entry_id, encode_entry(meta, sealed))], "count an attempt")

    def is_full(self) -> bool:
        """
        Whether new requests must be refused (503 with C{Retry-After}):
        true only with C{when_full="reject"} while the pending entries or
        bytes reach their limit.  The check reads committed state at most
        every L{USAGE_CHECK_INTERVAL} seconds, so the spool may overshoot
        by the requests of that interval.
        """
        if self.options.when_full != "reject" or self.store.env is None:
            return False
        now = self.reactor.seconds()
        if now - self._usage_checked_at < USAGE_CHECK_INTERVAL:
            return self._full
        self._usage_checked_at = now
        entries, size = self._usage()
        full = self._over_limit(entries, size)
        if full != self._full:
            self._full = full
            if full:
                self.log.warn(
                    "Spool is full ({entries} entries, {bytes} bytes); refusing new requests",
                    entries=entries, bytes=size,
                )
            else:
                self.log.info("Spool has room again ({entries} entries, {bytes} bytes)", entries=entries, bytes=size)
        return full

    # Life cycle

    def start(self) -> None:
        """
        Start the drain loop.  Entries left by a previous run are eligible
        at once.  The store must be open.
        """
        if self.store.env is None:
            raise SpoolClosed("the store must be open before the spool starts")
        for name in (SPOOL_DB, BODY_DB, DEAD_DB, DEAD_BODY_DB):
            self.store.database(name)
        self._running = True
        self._discover()
        entries, size = self._usage()
        self.log.info(
            "Spool started with {entries} pending entries ({bytes} bytes) for {upstreams} upstreams",
            entries=entries, bytes=size, upstreams=len(self._upstreams),
        )
        self._kick()

    def stop(self) -> Deferred:
        """
        Stop sending.  Replays in flight may finish for C{stop_timeout}
        seconds; then they are cancelled and their entries stay pending.

        @return: a L{Deferred} that fires once no replay is in flight.
        """
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._sending:
            return defer.succeed(None)
        self._stopping = Deferred()
        waiting = self._stopping
        deadline = self.reactor.callLater(self.options.stop_timeout, self._cancel_replays)
        waiting.addBoth(lambda result: (deadline.active() and deadline.cancel(), result)[1])
        return waiting

    def _cancel_replays(self) -> None:
        for d in list(self._sending.values()):
            d.cancel()

    # Status and metrics

    def status(self) -> dict:
        """
        Describe the spool for C{/health}: pending entries and bytes, the
        oldest entry's age, dead letters, counters and the circuit of each
        upstream.
        """
        if self.store.env is None:
            return {"state": "closed"}
        entries, size = self._usage()
        now = self.reactor.seconds()
        upstreams = {}
        for up in self._upstreams.values():
            upstreams[up.base] = {
                "circuit": up.circuit.state,
                "consecutive_failures": up.circuit.failures,
                "in_flight": up.in_flight,
                "next_attempt_in": max(0.0, up.circuit.next_allowed() - now),
            }
        oldest = self._oldest_ns()
        return {
            "state": "running" if self._running else "stopped",
            "depth": entries,
            "bytes": size,
            "full": self._over_limit(entries, size),
            "oldest_age": (self._clock_ns() - oldest) / 1e9 if oldest is not None else None,
            "live": len(self._live),
            "dead_letters": self._dead_count(),
            "dropped_oldest": self.counters.dropped_oldest,
            "counters": attrs.asdict(self.counters),
            "upstreams": upstreams,
        }

    def spool_references(self, txn, record_keys: list, blocks: list = ()) -> int:
        """
        Count the pending entries that retention's deletion reaches: those
        created no later than the newest deleted record (hot record keys,
        and packed blocks by their C{last_ns}).  Entries are matched by
        time, not by key: an entry is created just before its record, so
        this is an estimate that may count one entry too many at the edge.
        Each entry holds its own copy of the wire body, so deleting the
        record does not stop its delivery.

        @param txn: a read transaction of the store's environment.
        @return: the count, at most 100,000 (the scan stops there).
        """
        cutoff = 0
        for key in record_keys:
            cutoff = max(cutoff, int.from_bytes(bytes(key[:8]), "big"))
        for info in blocks:
            cutoff = max(cutoff, int(getattr(info, "last_ns", 0)))
        if not cutoff:
            return 0
        self._spool_db = self.store.database(SPOOL_DB)
        counted = 0
        cursor = txn.cursor(db=self._spool_db)
        for head in list(self._heads(txn)):
            prefix = head[:UPSTREAM_ID_SIZE]
            found = cursor.set_range(head)
            while found and counted < 100_000:
                key = cursor.key()
                if bytes(key[:UPSTREAM_ID_SIZE]) != prefix or entry_time_ns(bytes(key)) > cutoff:
                    break
                counted += 1
                found = cursor.next()
        return counted

    def metrics_collector(self, counters: bool = True) -> "SpoolCollector":
        """
        Return a Prometheus collector of the spool's gauges and counters,
        to register in the daemon's C{CollectorRegistry}.

        @param counters: whether it shows the counters (see
            L{SpoolCollector}).
        """
        return SpoolCollector(self, counters)

    # Reading the databases

    def _usage(self) -> tuple[int, int]:
        """
        Pending entries and the bytes of their pages (metadata and bodies).
        """
        spool_db, body_db = self.store.database(SPOOL_DB), self.store.database(BODY_DB)
        with self.store.env.begin() as txn:
            meta = txn.stat(spool_db)
            body = txn.stat(body_db)
        pages = sum(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"] for s in (meta, body))
        return meta["entries"], pages * meta["psize"]

    def _dead_count(self) -> int:
        dead_db = self.store.database(DEAD_DB)
        with self.store.env.begin() as txn:
            return txn.stat(dead_db)["entries"]

    def _over_limit(self, entries: int, size: int) -> bool:
        options = self.options
        return bool(
            (options.max_entries and entries >= options.max_entries)
            or (options.max_bytes and size >= options.max_bytes)
        )

    def _heads(self, txn) -> Iterable[bytes]:
        """
        Yield the first key of each upstream's range, one seek each.
        """
        cursor = txn.cursor(db=self._spool_db)
        found = cursor.first()
        while found:
            key = bytes(cursor.key())
            yield key
            prefix = key[:UPSTREAM_ID_SIZE]
            following = (int.from_bytes(prefix, "big") + 1)
            if following >> (8 * UPSTREAM_ID_SIZE):
                return
            found = cursor.set_range(following.to_bytes(UPSTREAM_ID_SIZE, "big"))

    def _oldest_ns(self) -> Optional[int]:
        self._spool_db = self.store.database(SPOOL_DB)
        with self.store.env.begin() as txn:
            times = [entry_time_ns(key) for key in self._heads(txn)]
        return min(times) if times else None

    def _discover(self) -> None:
        """
        Learn the upstreams that have pending entries (from a previous run
        or re-queued by C{reductrai-inspect}).
        """
        db = self._spool_db = self.store.database(SPOOL_DB)
        with self.store.env.begin(buffers=False) as txn:
            for key in list(self._heads(txn)):
                prefix = key[:UPSTREAM_ID_SIZE]
                up = self._upstreams.get(prefix)
                if up is not None:
                    continue
                try:
                    meta, _ = decode_entry(txn.get(key, db=db))
                except EntryError:
                    self._errors.emit("corrupt", LogLevel.error, "Spool entry {entry} is corrupt", entry=entry_id_to_text(key))
                    continue
                self._upstream_for(meta.upstream)

    def _upstream_for(self, base: str) -> _Upstream:
        prefix = upstream_id(base)
        up = self._upstreams.get(prefix)
        if up is None:
            options = self.options
            up = self._upstreams[prefix] = _Upstream(
                id=prefix,
                base=base,
                circuit=Circuit(options.circuit_failures, options.backoff_base, options.backoff_cap, self._rng),
                bucket=TokenBucket(options.drain_rate, options.max_concurrency, self.reactor.seconds()),
            )
        return up

    def _new_id(self, prefix: bytes) -> bytes:
        now = self._clock_ns()
        if now <= self._last_ns:
            now = self._last_ns + 1
        self._last_ns = now
        self._sequence = (self._sequence + 1) & 0xFFFFFFFF
        return make_entry_id(prefix, now, self._sequence, self.worker)

    def _owned_by_another_live_worker(self, key: bytes) -> bool:
        """
        Whether an entry was created by another worker less than
        C{live_grace} seconds ago: its live forward may still be running
        there, so the drain loop must not send it yet.
        """
        if entry_worker(key) == self.worker:
            return False
        return self._clock_ns() - entry_time_ns(key) < self.options.live_grace * 1e9

    def _load_batch(self, up: _Upstream) -> int:
        """
        Read the next C{batch_size} keys of an upstream's range after its
        position into its buffer; at the end of the range, start over from
        its head next time.

        @return: how many keys were read.
        """
        db = self.store.database(SPOOL_DB)
        limit = self.options.batch_size
        read = 0
        with self.store.env.begin(db=db, buffers=False) as txn:
            cursor = txn.cursor()
            if up.position is None:
                found = cursor.set_range(up.id)
            else:
                found = cursor.set_range(up.position)
                if found and cursor.key() == up.position:
                    found = cursor.next()
            while found and read < limit:
                key = cursor.key()
                if not key.startswith(up.id):
                    break
                up.buffer.append(key)
                read += 1
                found = cursor.next()
        self.counters.batches_read += 1
        self.counters.entries_read += read
        self.counters.largest_batch = max(self.counters.largest_batch, read)
        if read < limit:
            up.position = None
        else:
            up.position = up.buffer[-1]
        return read

    def _next_key(self, up: _Upstream) -> Optional[bytes]:
        """
        The oldest key of an upstream that is neither live nor being sent,
        reading at most a few batches.
        """
        batches = 0
        while True:
            while up.buffer:
                key = up.buffer.popleft()
                if key in self._sending or key in self._live or key in self._committing:
                    continue
                if self._owned_by_another_live_worker(key):
                    continue
                return key
            if batches >= _MAX_BATCHES_PER_PUMP:
                return None
            wrapped = up.position is None
            read = self._load_batch(up)
            batches += 1
            if read == 0 and wrapped:
                return None

    def _rewind(self, up: _Upstream) -> None:
        """
        Restart an upstream's scan from its head, so that a failed entry is
        retried before newer ones.
        """
        up.buffer.clear()
        up.position = None

    # The drain loop

    def _kick(self) -> None:
        self._wake(self.reactor.seconds())

    def _wake(self, at: float) -> None:
        if not self._running or not self.drains:
            return
        if self._timer is not None and self._timer.active():
            if self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.reactor.callLater(max(0.0, at - self.reactor.seconds()), self._pump)

    def _expire_live(self, now: float) -> bool:
        expired = False
        while self._live:
            entry_id, deadline = next(iter(self._live.items()))
            if deadline > now:
                break
            del self._live[entry_id]
            expired = True
        return expired

    def _pump(self) -> None:
        """
        Send what may be sent now, then sleep until the earliest moment
        something may change (a backoff ending, a token, a live entry's
        grace ending) or the poll interval.
        """
        self._timer = None
        if not self._running or self.store.env is None:
            return
        now = self.reactor.seconds()
        expired = self._expire_live(now)
        if now - self._discovered_at >= self.options.poll_interval:
            self._discovered_at = now
            self._discover()
        next_wake = now + self.options.poll_interval
        if expired:
            # An entry whose grace ended in the turn that created it is
            # committed only at the end of that turn: look again then.
            next_wake = now + 0.01
        if self._live:
            next_wake = min(next_wake, next(iter(self._live.values())))
        for up in list(self._upstreams.values()):
            wake = self._drain_upstream(up, now)
            if wake is not None:
                next_wake = min(next_wake, wake)
        self._wake(max(next_wake, now + 0.001))

    def _drain_upstream(self, up: _Upstream, now: float) -> Optional[float]:
        """
        Start replays for one upstream within its limits.

        @return: when to look again, or L{None} when only an event can
            create work.
        """
        while up.in_flight < self.options.max_concurrency:
            if not up.circuit.allows(now):
                return up.circuit.next_allowed() if not up.circuit.probing else None
            token_at = up.bucket.next_token(now)
            if token_at > now:
                return token_at
            key = self._next_key(up)
            if key is None:
                return None
            if not self._send(up, key, now):
                continue
            up.bucket.take(now)
            if up.circuit.state == HALF_OPEN:
                return None
        return None

    def _send(self, up: _Upstream, key: bytes, now: float) -> bool:
        """
        Start the replay of one entry, or dead-letter it when it is too
        old, has had too many attempts or cannot be read.

        @return: whether a request was started.
        """
        spool_db, body_db = self.store.database(SPOOL_DB), self.store.database(BODY_DB)
        with self.store.env.begin(buffers=False) as txn:
            value = txn.get(key, db=spool_db)
            stored_body = txn.get(key, db=body_db)
        if value is None:
            return False
        try:
            meta, sealed = decode_entry(value)
        except EntryError as error:
            self._dead_letter(key, None, b"", stored_body, str(error), None)
            return False
        options = self.options
        if options.max_age and self._clock_ns() - meta.created_ns > options.max_age * 1e9:
            self._dead_letter(key, meta, sealed, stored_body, f"older than spool.max_age ({options.max_age:g} s)", meta.status)
            return False
        if options.max_attempts and meta.attempts >= options.max_attempts:
            self._dead_letter(key, meta, sealed, stored_body, f"{meta.attempts} attempts failed (spool.max_attempts)", meta.status)
            return False
        if stored_body is None:
            self._dead_letter(key, meta, sealed, None, "the body is missing", meta.status)
            return False
        try:
            body = self._codec.decode(stored_body)
        except EntryError as error:
            self._dead_letter(key, meta, sealed, stored_body, str(error), meta.status)
            return False
        headers = Headers()
        if sealed:
            try:
                target, header_list = decode_credentials(self.keybox.open(sealed, key))
            except (KeyBoxError, ValueError, KeyError) as error:
                self._dead_letter(key, meta, b"", stored_body, f"sealed credentials unusable: {error}", meta.status)
                return False
            for name, value in header_list:
                headers.addRawHeader(name, value)
        else:
            # NOTE: an entry re-queued from the dead letters has no sealed
            # credentials: it is sent to its redacted target with the stored
            # headers, plus what add_credentials supplies.  A key that was in
            # the path stays "<redacted>", so such a replay is likely rejected.
            target = meta.display.encode("latin-1")
            for name, value in meta.headers or ():
                headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
            if self._add_credentials is not None:
                self._add_credentials(up.base, headers)
        up.circuit.sending()
        up.in_flight += 1
        method = meta.method.encode("latin-1")
        d = defer.maybeDeferred(
            self.forwarder.forward, up.base, method, target, headers,
            body if body or method != b"GET" else None, meta.display,
        )
        self._sending[key] = d
        d.addBoth(self._sent, up, key, meta, sealed, stored_body)
        d.addErrback(lambda failure: self.log.failure("Spool replay bookkeeping failed", failure))
        return True

    def _sent(self, result, up: _Upstream, key: bytes, meta: EntryMeta, sealed: bytes, stored_body: bytes) -> None:
        del self._sending[key]
        up.in_flight -= 1
        try:
            if not self._running:
                if isinstance(result, UpstreamResponse) and 200 <= result.status <= 299:
                    self.counters.delivered += 1
                    self._submit(self._delete_ops(key), "delete a delivered entry")
                else:
                    up.circuit.aborted()
                return
            self._outcome(result, up, key, meta, sealed, stored_body)
        finally:
            if not self._sending and self._stopping is not None:
                stopping, self._stopping = self._stopping, None
                stopping.callback(None)
            self._kick()

    def _outcome(self, result, up: _Upstream, key: bytes, meta: EntryMeta, sealed: bytes, stored_body: bytes) -> None:
        retry_after = None
        if isinstance(result, Failure):
            if not result.check(UpstreamError):
                self.log.failure("Spool replay to {upstream} failed unexpectedly", result, upstream=up.base)
            status = None
            reason = result.value.reason if result.check(UpstreamError) else result.getErrorMessage()
        else:
            status = result.status
            reason = f"upstream answered {status}"
            retry_after = parse_retry_after(
                (result.headers.getRawHeaders(b"retry-after") or [None])[0], self._clock_ns() / 1e9
            )
            if retry_after is not None:
                retry_after = min(retry_after, self.options.max_retry_after)
        if status is not None and 200 <= status <= 299:
            self.counters.delivered += 1
            self._submit(self._delete_ops(key), "delete a delivered entry")
            self._circuit_succeeded(up)
            return
        if retryable_status(status):
            self.counters.retries += 1
            attempts = meta.attempts + 1
            self._circuit_failed(up, status, retry_after, reason)
            self._rewind(up)
            if self.options.max_attempts and attempts >= self.options.max_attempts:
                self._dead_letter(key, attrs.evolve(meta, attempts=attempts), sealed, stored_body,
                                  f"{attempts} attempts failed (spool.max_attempts); last: {reason}", status)
                return
            updated = attrs.evolve(meta, attempts=attempts, status=status)
            self._submit([("put", SPOOL_DB, key, encode_entry(updated, sealed))], "count an attempt")
            return
        # A permanent answer: the upstream will not take this request as it
        # is, but it is up and answering, which closes its circuit.
        self._circuit_succeeded(up)
        self._dead_letter(key, attrs.evolve(meta, attempts=meta.attempts + 1), sealed, stored_body, reason, status)

    # Circuit bookkeeping

    def _circuit_succeeded(self, up: _Upstream) -> None:
        previous = up.circuit.succeeded()
        if previous is not None:
            up.bucket.tokens = min(up.bucket.tokens, 1.0)
            self.log.info(
                "Upstream {upstream} accepts requests again; circuit closed after being {previous}",
                upstream=up.base, previous=previous,
            )

    def _circuit_failed(self, up: _Upstream, status: Optional[int], retry_after: Optional[float], reason: str) -> None:
        now = self.reactor.seconds()
        changed = up.circuit.failed(now, retry_after)
        if changed == OPEN:
            self.log.warn(
                "Upstream {upstream} is failing ({reason}); circuit open, next probe in {delay:.3f} s",
                upstream=up.base, reason=reason, delay=up.circuit.reopen_at - now,
            )
        else:
            self._errors.emit(
                f"retry:{up.base}", LogLevel.info,
                "Spool delivery to {upstream} failed ({reason}); retrying in {delay:.3f} s",
                upstream=up.base, reason=reason, delay=up.circuit.not_before - now,
            )

    # Writes

    def _delete_ops(self, key: bytes) -> list:
        return [("delete", SPOOL_DB, key, None), ("delete", BODY_DB, key, None)]

    def _dead_letter(
        self,
        key: bytes,
        meta: Optional[EntryMeta],
        sealed: bytes,
        stored_body: Optional[bytes],
        reason: str,
        status: Optional[int],
    ) -> None:
        """
        Move an entry to the dead letters with its reason.  The sealed
        credentials are deleted; the dead letter keeps the storable
        headers and the redacted target.
        """
        self.counters.dead_lettered += 1
        if meta is None:
            meta = EntryMeta(upstream="", method="", display="", created_ns=entry_time_ns(key))
        headers = meta.headers
        if sealed:
            try:
                _, header_list = decode_credentials(self.keybox.open(sealed, key))
                block = Headers()
                for name, value in header_list:
                    block.addRawHeader(name, value)
                headers = storable_headers(block, CREDENTIAL_HEADERS)
            except (KeyBoxError, ValueError, KeyError):
                headers = None
        dead = attrs.evolve(meta, reason=reason, status=status, headers=headers, dead_ns=self._clock_ns())
        ops = [("put", DEAD_DB, key, encode_entry(dead)), ("delete", SPOOL_DB, key, None)]
        if stored_body is not None:
            ops += [("put", DEAD_BODY_DB, key, stored_body), ("delete", BODY_DB, key, None)]
        self._submit(ops, "move an entry to the dead letters")
        self._errors.emit(
            f"dead:{meta.upstream}", LogLevel.warn,
            "Spool entry {entry} for {upstream} moved to the dead letters: {reason}",
            entry=entry_id_to_text(key), upstream=meta.upstream, reason=reason,
        )

    def _submit(self, ops: list, what: str) -> Deferred:
        """
        Commit C{ops} with the store's next group commit.  Until then the
        entries they touch are not sent: LMDB still shows their old state.
        """
        keys = {key for _, _, key, _ in ops}
        for key in keys:
            self._committing[key] = self._committing.get(key, 0) + 1

        def committed(result):
            for key in keys:
                left = self._committing.pop(key, 1) - 1
                if left > 0:
                    self._committing[key] = left
            return result

        d = self.store.submit(ops)
        d.addBoth(committed)
        d.addErrback(lambda failure: self._errors.emit(
            f"submit:{what}", LogLevel.error, "Spool could not {what}: {error}", what=what, error=failure.getErrorMessage(),
        ))
        return d

    def _make_room(self, incoming: int) -> None:
        """
        Delete the oldest pending entries until one more entry of
        C{incoming} bytes fits, counting them as dropped.
        """
        entries, size = self._usage()
        entries -= len(self._dropping)
        options = self.options
        need_entries = entries + 1 - options.max_entries if options.max_entries else 0
        need_bytes = size + incoming - options.max_bytes if options.max_bytes else 0
        if need_entries <= 0 and need_bytes <= 0:
            return
        db = self._spool_db = self.store.database(SPOOL_DB)
        body_db = self.store.database(BODY_DB)
        victims: list[tuple[int, bytes, int]] = []
        budget = min(_MAX_DROPS_PER_ENTRY, max(need_entries, 1) + 64)
        with self.store.env.begin(buffers=True) as txn:
            cursor = txn.cursor(db=db)
            for head in list(self._heads(txn)):
                prefix = head[:UPSTREAM_ID_SIZE]
                found = cursor.set_range(head)
                taken = 0
                while found and taken < budget:
                    key = bytes(cursor.key())
                    if not key.startswith(prefix):
                        break
                    if key not in self._dropping:
                        body = txn.get(key, db=body_db)
                        victims.append((entry_time_ns(key), key, len(cursor.value()) + (len(body) if body else 0)))
                        taken += 1
                    found = cursor.next()
        victims.sort()
        ops: list = []
        chosen: list[bytes] = []
        freed = 0
        for _, key, freed_size in victims:
            if len(chosen) >= max(need_entries, 0) and freed >= need_bytes:
                break
            if len(chosen) >= _MAX_DROPS_PER_ENTRY:
                break
            chosen.append(key)
            freed += freed_size
            ops += self._delete_ops(key)
        if not chosen:
            return
        self._dropping.update(chosen)
        self.counters.dropped_oldest += len(chosen)
        self._errors.emit(
            "drop_oldest", LogLevel.warn,
            "Spool is full; dropped the {count} oldest undelivered entries (spool.when_full = drop_oldest)",
            count=len(chosen),
        )
        self._submit(ops, "drop the oldest entries").addBoth(lambda _: self._dropping.difference_update(chosen))


#: The counters of L{SpoolCounters} that C{/metrics} shows: field, metric
#: name, help and the C{reason} label of C{reductrai_spool_dropped}.
_COUNTER_METRICS = (
    ("delivered", "reductrai_spool_delivered", "Spooled requests the upstream accepted.", None),
    ("retries", "reductrai_spool_retries", "Failed replays that will be retried.", None),
    ("dead_lettered", "reductrai_spool_dead_lettered", "Requests moved to the dead letters.", None),
    ("dropped_oldest", "reductrai_spool_dropped", "Requests removed undelivered, by reason.", "oldest"),
    ("rejected_by_upstream", "reductrai_spool_dropped", "Requests removed undelivered, by reason.", "rejected_by_upstream"),
)


class SpoolCounterMirror:
    """
    Copy a spool's L{SpoolCounters} into prometheus_client counters, for
    the multiprocess mode of L{reductrai.metrics}: there each worker's
    counters land in its metric files and C{/metrics} sums them.  The
    service calls L{sync} every second and once when it stops.
    """

    def __init__(self, spool: Spool) -> None:
        from prometheus_client import Counter

        self.spool = spool
        self._metrics: dict[str, object] = {}
        self._copied: dict[str, int] = {}
        families: dict[str, object] = {}
        for field, name, help_text, reason in _COUNTER_METRICS:
            if reason is None:
                self._metrics[field] = Counter(name, help_text, registry=None)
            else:
                family = families.get(name)
                if family is None:
                    family = families[name] = Counter(name, help_text, ["reason"], registry=None)
                self._metrics[field] = family.labels(reason)
            self._copied[field] = 0

    def sync(self) -> None:
        """
        Add what each counter gained since the last call.
        """
        counters = self.spool.counters
        for field, metric in self._metrics.items():
            value = getattr(counters, field)
            gained = value - self._copied[field]
            if gained > 0:
                metric.inc(gained)
                self._copied[field] = value


class SpoolCollector:
    """
    Prometheus collector of a L{Spool}, read at scrape time.
    """

    def __init__(self, spool: Spool, counters: bool = True) -> None:
        """
        @param counters: whether to show the counters too; without them
            (multiprocess mode) a L{SpoolCounterMirror} in each worker
            provides them.
        """
        self.spool = spool
        self.counters = counters

    def describe(self):
        return []

    def collect(self):
        spool = self.spool
        counters = spool.counters
        if spool.store.env is not None:
            entries, size = spool._usage()
            oldest = spool._oldest_ns()
            dead = spool._dead_count()
        else:
            entries = size = dead = 0
            oldest = None
        yield GaugeMetricFamily("reductrai_spool_entries", "Undelivered requests in the spool.", value=entries)
        yield GaugeMetricFamily("reductrai_spool_bytes", "Bytes of the spool's pages (metadata and wire bodies).", value=size)
        age = (spool._clock_ns() - oldest) / 1e9 if oldest is not None else 0.0
        yield GaugeMetricFamily("reductrai_spool_oldest_age_seconds", "Age of the oldest undelivered request.", value=age)
        yield GaugeMetricFamily("reductrai_spool_dead_letters", "Requests in the dead letters.", value=dead)
        yield GaugeMetricFamily("reductrai_spool_live", "Requests whose live forward is still running.", value=len(spool._live))
        yield from self._circuits()
        if not self.counters:
            return
        yield CounterMetricFamily("reductrai_spool_delivered", "Spooled requests the upstream accepted.", value=counters.delivered)
        yield CounterMetricFamily("reductrai_spool_retries", "Failed replays that will be retried.", value=counters.retries)
        yield CounterMetricFamily("reductrai_spool_dead_lettered", "Requests moved to the dead letters.", value=counters.dead_lettered)
        dropped = CounterMetricFamily("reductrai_spool_dropped", "Requests removed undelivered, by reason.", labels=["reason"])
        dropped.add_metric(["oldest"], counters.dropped_oldest)
        dropped.add_metric(["rejected_by_upstream"], counters.rejected_by_upstream)
        yield dropped

    def _circuits(self):
        spool = self.spool
        circuit = GaugeMetricFamily("reductrai_spool_circuit", "1 for the current circuit state of each upstream.", labels=["upstream", "state"])
        in_flight = GaugeMetricFamily("reductrai_spool_in_flight", "Replays in flight per upstream.", labels=["upstream"])
        for up in spool._upstreams.values():
            for state in (CLOSED, OPEN, HALF_OPEN):
                circuit.add_metric([up.base, state], 1.0 if up.circuit.state == state else 0.0)
            in_flight.add_metric([up.base], up.in_flight)
        yield circuit
        yield in_flight
