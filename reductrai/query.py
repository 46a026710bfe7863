"""
The query API of the admin listener: stored records and the items parsed
from them, as JSON (or NDJSON when streaming).

Endpoints, all C{GET}, under C{/api/v1}:

  - C{records}: C{from}, C{to} (RFC 3339 or epoch seconds; arrival time),
    C{vendor}, C{kind}, C{limit}, C{cursor} (opaque, from C{next_cursor}),
    C{include=body} (decoded body as JSON or text, base64 when binary) or
    C{include=body_base64} (always base64).  Scans records in key order.
  - C{logs}: C{service}, C{host}, C{level}, C{q} (substring of the
    message), C{from}, C{to} (item time), C{limit}, C{cursor}.  With
    C{service} or C{host} the secondary index finds the records; otherwise
    records of kind C{logs} in the range are scanned and parsed.
  - C{traces/<trace_id>}: every stored span of the trace, any vendor, via
    the trace-id index; C{scan=1} scans records of kind C{traces} instead.
  - C{metrics/<name>}: C{from}, C{to}, C{tag=key:value} (repeatable),
    C{step} (seconds) with C{agg} one of C{avg}, C{sum}, C{min}, C{max},
    C{count}.  Via the metric-name index.
  - C{events}: C{from}, C{to}, C{service}, C{host}, C{q}; scans records of
    kind C{events}.

Indexed lookups find only records stored with items (see
L{reductrai.store.RecordStore.append}); C{index=0} forces a scan.  Item
queries widen the arrival-time range by L{QueryOptions.skew} to find items
whose own timestamps are earlier or later than their request's arrival.

Every query runs in a thread on its own read transaction, at most
L{QueryOptions.concurrency} at a time, and is bounded by a result limit, a
count of records examined and a time budget.  A query beyond them is
answered 400 (bad or too large a limit) or 413 (too much to examine) with
a JSON C{error} and a C{hint} saying how to narrow it.  A corrupt record or
block is reported in C{errors} and the query goes on.
"""

from __future__ import annotations

import base64
import datetime
import json
import time
from typing import Any, Callable, Iterator, Optional

import attrs
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from reductrai.formats.items import EVENT, LOG, METRIC, SERVICE_CHECK, SKETCH, SPAN, Item
from reductrai.indexes import HOST, METRIC_NAME, SERVICE, TRACE, lookup, parse_record
from reductrai.record import RecordError, RecordHeader, key_to_text, make_key
from reductrai.store import INDEX_DB, Entry, StoreView


@attrs.frozen
class QueryOptions:
    """
    @ivar max_limit: largest C{limit} accepted.
    @ivar default_limit: C{limit} when none is given.
    @ivar max_examined: records a query may examine at most.
    @ivar max_seconds: time a query may take at most.
    @ivar skew: seconds by which item queries widen the arrival range.
    @ivar concurrency: queries running at once at most.
    @ivar max_points: metric points or buckets a query may return.
    """

    max_limit: int = 10000
    default_limit: int = 100
    max_examined: int = 200_000
    max_seconds: float = 10.0
    skew: float = 600.0
    concurrency: int = 2
    max_points: int = 100_000


class QueryError(Exception):
    """
    The query cannot be answered as asked.
    """

    def __init__(self, status: int, error: str, hint: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.hint = hint


def parse_time_ns(text: str, name: str) -> int:
    """
    Parse an RFC 3339 time or epoch seconds (fractions allowed) into
    nanoseconds.

    @raise QueryError: neither form.
    """
    try:
        return int(float(text) * 1_000_000_000)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise QueryError(400, f"invalid {name} {text!r}", "use RFC 3339 (2026-12-04T10:00:00Z) or epoch seconds") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp() * 1_000_000) * 1000


def format_time(time_ns: Optional[int]) -> Optional[str]:
    if time_ns is None:
        return None
    moment = datetime.datetime.fromtimestamp(time_ns / 1e9, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def encode_cursor(key: bytes, index: int = -1) -> str:
    return base64.urlsafe_b64encode(key + index.to_bytes(4, "big", signed=True)).decode("ascii").rstrip("=")


def decode_cursor(text: str) -> tuple[bytes, int]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise QueryError(400, "invalid cursor", "pass next_cursor from a previous answer unchanged")
    return raw[:12], int.from_bytes(raw[12:], "big", signed=True)


class Params:
    """
    Query-string access with errors that say what is wrong.
    """

    def __init__(self, args: dict[bytes, list[bytes]]) -> None:
        self._args = {k.decode("utf-8", "replace"): [v.decode("utf-8", "replace") for v in vs] for k, vs in args.items()}

    def get(self, name: str) -> Optional[str]:
        values = self._args.get(name)
        return values[-1] if values else None

    def all(self, name: str) -> list[str]:
        return self._args.get(name, [])

    def time(self, name: str) -> Optional[int]:
        value = self.get(name)
        return parse_time_ns(value, name) if value else None

    def integer(self, name: str, default: int) -> int:
        value = self.get(name)
        if value is None or value == "":
            return default
        try:
            return int(value)
        except ValueError:
            raise QueryError(400, f"invalid {name} {value!r}", f"{name} is a whole number") from None


def body_document(header: RecordHeader, body: bytes) -> Any:
    """
    Return a body for JSON: parsed JSON, text, or C{{"base64": ...}}.
    """
    media = (header.content_type or "").lower()
    if "json" in media or body[:1] in (b"{", b"["):
        try:
            return json.loads(body)
        except ValueError:
            pass
    if "protobuf" not in media and "msgpack" not in media:
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return {"base64": base64.b64encode(body).decode("ascii")}


def record_document(entry: Entry) -> dict:
    header = entry.header
    document = {
        "key": key_to_text(entry.key),
        "time": format_time(header.received_ns),
        "vendor": header.vendor,
        "kind": header.kind,
        "route": header.route,
        "method": header.method,
        "path": header.path,
        "query": header.query,
        "content_type": header.content_type,
        "content_encoding": header.content_encoding,
        "headers": header.headers,
        "wire_bytes": header.wire_size,
        "raw_bytes": header.size,
        "stored_bytes": entry.stored_bytes,
        "packed": entry.block is not None,
    }
    if header.items is not None:
        document["items"] = header.items
    return document


def item_document(item: Item, entry: Entry) -> dict:
    document = {name: value for name, value in attrs.asdict(item).items() if value not in (None, {})}
    document["time"] = format_time(item.timestamp_ns if item.timestamp_ns is not None else entry.header.received_ns)
    document["record"] = key_to_text(entry.key)
    document["vendor"] = entry.header.vendor
    return document


class _Budget:
    def __init__(self, options: QueryOptions, hint: str) -> None:
        self.options = options
        self.deadline = time.monotonic() + options.max_seconds
        self.examined = 0
        self.hint = hint

    def tick(self) -> None:
        self.examined += 1
        if self.examined > self.options.max_examined:
            raise QueryError(
                413, f"the query would examine more than {self.options.max_examined} records", self.hint
            )
        if self.examined % 64 == 0 and time.monotonic() > self.deadline:
            raise QueryError(413, f"the query took longer than {self.options.max_seconds} seconds", self.hint)


class QueryEngine:
    """
    Answer queries against a store from a worker thread.

    @param view_factory: returns a fresh L{StoreView} for the calling
        thread.
    """

    def __init__(self, view_factory: Callable[[], StoreView], options: QueryOptions = QueryOptions()) -> None:
        self.view_factory = view_factory
        self.options = options

    def _limit(self, params: Params) -> int:
        limit = params.integer("limit", self.options.default_limit)
        if limit < 1 or limit > self.options.max_limit:
            raise QueryError(
                400, f"limit must be between 1 and {self.options.max_limit}",
                "page through larger results with next_cursor",
            )
        return limit

    def _range(self, params: Params) -> tuple[int, Optional[int]]:
        start = params.time("from") or 0
        end = params.time("to")
        if end is not None and end <= start:
            raise QueryError(400, "to must be later than from", "swap from and to")
        return start, end

    def records(self, params: Params) -> dict:
        limit = self._limit(params)
        start, end = self._range(params)
        include = set(",".join(params.all("include")).split(","))
        cursor = params.get("cursor")
        after = decode_cursor(cursor)[0] if cursor else None
        budget = _Budget(self.options, "narrow the range with from and to, or filter by vendor and kind")
        view = self.view_factory()
        results, errors = [], []
        next_cursor = None
        with view.begin() as txn:
            for entry in view.scan(txn, start, end, params.get("vendor"), params.get("kind"), after):
                budget.tick()
                if len(results) >= limit:
                    next_cursor = encode_cursor(results_last_key)
                    break
                results_last_key = entry.key
                if entry.error is not None:
                    errors.append({"key": key_to_text(entry.key), "error": entry.error})
                    continue
                document = record_document(entry)
                if "body" in include or "body_base64" in include:
                    try:
                        header, body = view.decode(entry)
                    except RecordError as error:
                        errors.append({"key": key_to_text(entry.key), "error": str(error)})
                        continue
                    if "body_base64" in include:
                        document["body_base64"] = base64.b64encode(body).decode("ascii")
                    else:
                        document["body"] = body_document(header, body)
                results.append(document)
        return {"records": results, "next_cursor": next_cursor, "errors": errors, "examined": budget.examined}

    def _entries(
        self,
        view: StoreView,
        txn,
        params: Params,
        kinds: tuple[str, ...],
        index_terms: list[tuple[bytes, str]],
        start: int,
        end: Optional[int],
        after: Optional[bytes],
        budget: _Budget,
    ) -> Iterator[Entry]:
        """
        Yield candidate records: from the index when a term is given,
        otherwise by scanning records of the given kinds.
        """
        skew = int(self.options.skew * 1e9)
        low = max(0, start - skew)
        high = end + skew if end is not None else None
        if index_terms and params.get("index") != "0":
            field, term = index_terms[0]
            from_key = make_key(low, 0)
            if after is not None and after > from_key:
                from_key = after
            to_key = make_key(high, 0) if high is not None else None
            keys = lookup(txn, view.handles[INDEX_DB], field, term, from_key, to_key) if view.handles[INDEX_DB] else ()
            for key in keys:
                budget.tick()
                entry = view.get(txn, key)
                if entry is not None:
                    yield entry
            return
        # The cursor's record is read again: the cursor names an item in it.
        if after is not None:
            low = max(low, int.from_bytes(after[:8], "big"))
        for entry in view.scan(txn, low, high):
            if after is not None and entry.key < after:
                continue
            budget.tick()
            if entry.header is not None and kinds and entry.header.kind not in kinds:
                continue
            yield entry

    def _items(
        self,
        params: Params,
        kinds: tuple[str, ...],
        index_terms: list[tuple[bytes, str]],
        accept: Callable[[Item], bool],
        hint: str,
        limit: Optional[int] = None,
    ) -> dict:
        limit = limit or self._limit(params)
        start, end = self._range(params)
        cursor = params.get("cursor")
        after, after_index = decode_cursor(cursor) if cursor else (None, -1)
        budget = _Budget(self.options, hint)
        view = self.view_factory()
        # Items carry their own timestamps: the records' ranges are not needed.
        view.item_times = False
        results, errors = [], []
        next_cursor = None
        with view.begin() as txn:
            for entry in self._entries(view, txn, params, kinds, index_terms, start, end, after, budget):
                if entry.error is not None:
                    errors.append({"key": key_to_text(entry.key), "error": entry.error})
                    continue
                try:
                    header, body = view.decode(entry)
                except RecordError as error:
                    errors.append({"key": key_to_text(entry.key), "error": str(error)})
                    continue
                parsed = parse_record(header, body)
                if parsed is None:
                    continue
                for position, item in enumerate(parsed.items):
                    if after is not None and entry.key == after and position <= after_index:
                        continue
                    moment = item.timestamp_ns if item.timestamp_ns is not None else header.received_ns
                    if moment < start or (end is not None and moment >= end) or not accept(item):
                        continue
                    if len(results) >= limit:
                        next_cursor = encode_cursor(last[0], last[1])
                        return {"items": results, "next_cursor": next_cursor, "errors": errors, "examined": budget.examined}
                    results.append(item_document(item, entry))
                    last = (entry.key, position)
        return {"items": results, "next_cursor": next_cursor, "errors": errors, "examined": budget.examined}

    def logs(self, params: Params) -> dict:
        service, host, level, needle = params.get("service"), params.get("host"), params.get("level"), params.get("q")
        terms = [(SERVICE, service)] if service else [(HOST, host)] if host else []

        def accept(item: Item) -> bool:
            return (
                item.kind == LOG
                and (service is None or item.service == service)
                and (host is None or item.host == host)
                and (level is None or (item.level or "").lower() == level.lower())
                and (needle is None or needle in (item.message or ""))
            )

        return self._items(params, ("logs",), terms, accept, "narrow the range with from and to, or filter by service or host")

    def events(self, params: Params) -> dict:
        service, host, needle = params.get("service"), params.get("host"), params.get("q")

        def accept(item: Item) -> bool:
            return (
                item.kind in (EVENT, SERVICE_CHECK)
                and (service is None or item.service == service)
                and (host is None or item.host == host)
                and (needle is None or needle in (item.message or "") or needle in (item.name or ""))
            )

        return self._items(params, ("events", "service_checks"), [], accept, "narrow the range with from and to")

    def trace(self, trace_id: str, params: Params) -> dict:
        wanted = trace_id.lower().rjust(32, "0")
        if len(wanted) != 32 or any(c not in "0123456789abcdef" for c in wanted):
            raise QueryError(400, f"invalid trace id {trace_id!r}", "give the trace id in hex (16 or 32 digits)")
        terms = [] if params.get("scan") == "1" else [(TRACE, wanted)]
        result = self._items(
            params, ("traces",), terms, lambda item: item.kind == SPAN and item.trace_id == wanted,
            "give from and to around the trace's time", limit=self.options.max_limit,
        )
        return {"trace_id": wanted, "spans": result["items"], "errors": result["errors"], "examined": result["examined"]}

    def metric(self, name: str, params: Params) -> dict:
        tags = {}
        for tag in params.all("tag"):
            key, _, value = tag.partition(":")
            tags[key] = value
        step = params.get("step")
        aggregation = params.get("agg") or "avg"
        if aggregation not in ("avg", "sum", "min", "max", "count"):
            raise QueryError(400, f"invalid agg {aggregation!r}", "use avg, sum, min, max or count")

        def accept(item: Item) -> bool:
            return (
                item.kind in (METRIC, SKETCH)
                and item.name == name
                and all(item.tags.get(key) == value for key, value in tags.items())
            )

        result = self._items(
            params, ("metrics",), [(METRIC_NAME, name)], accept,
            "narrow the range with from and to, or add tag filters", limit=self.options.max_points,
        )
        if result["next_cursor"] is not None:
            raise QueryError(
                413, f"the query matches more than {self.options.max_points} points",
                "narrow the range with from and to, or use step to aggregate",
            )
        points = [{"time": i["time"], "value": i.get("value"), "tags": i.get("tags", {}), "record": i["record"]} for i in result["items"]]
        document: dict = {"name": name, "errors": result["errors"], "examined": result["examined"]}
        if not step:
            document["points"] = points
            return document
        try:
            step_ns = int(float(step) * 1e9)
        except ValueError:
            step_ns = 0
        if step_ns <= 0:
            raise QueryError(400, f"invalid step {step!r}", "step is a positive number of seconds")
        buckets: dict[int, list[float]] = {}
        for item in result["items"]:
            if item.get("value") is None:
                continue
            moment = parse_time_ns(item["time"], "time")
            buckets.setdefault(moment - moment % step_ns, []).append(float(item["value"]))
        functions = {
            "avg": lambda values: sum(values) / len(values),
            "sum": sum,
            "min": min,
            "max": max,
            "count": len,
        }
        document["step"] = step_ns / 1e9
        document["agg"] = aggregation
        document["buckets"] = [
            {"time": format_time(start), "value": functions[aggregation](values), "count": len(values)}
            for start, values in sorted(buckets.items())
        ]
        return document


def _write_json(request, status: int, document: Any) -> None:
    body = json.dumps(document, separators=(",", ":")).encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", str(len(body)).encode("ascii"))
    request.write(body)
    request.finish()


def _write_ndjson(request, rows: list, trailer: dict) -> None:
    request.setResponseCode(200)
    request.setHeader(b"content-type", b"application/x-ndjson")
    for row in rows:
        request.write(json.dumps(row, separators=(",", ":")).encode("utf-8") + b"\n")
    request.write(json.dumps(trailer, separators=(",", ":")).encode("utf-8") + b"\n")
    request.finish()


def _wants_ndjson(request, params: Params) -> bool:
    accept = request.getHeader(b"accept") or b""
    return params.get("format") == "ndjson" or b"application/x-ndjson" in accept


class _QueryLeaf(Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, api: "QueryResource", run: Callable[[Any, Params], dict], rows_key: str, argument: Optional[str] = None) -> None:
        super().__init__()
        self.api = api
        self.run = run
        self.rows_key = rows_key
        self.argument = argument

    def render_GET(self, request):
        params = Params(request.args)
        argument = None
        if self.argument is not None:
            parts = [p for p in request.postpath if p]
            if len(parts) != 1:
                _write_json(request, 404, {"error": f"expected /{self.argument}", "hint": f"put the {self.argument} in the path"})
                return NOT_DONE_YET
            argument = parts[0].decode("utf-8", "replace")
        d = self.api.semaphore.run(threads.deferToThreadPool, self.api.reactor, self.api.reactor.getThreadPool(),
                                    self.run, argument, params)

        def answer(document: dict):
            if request._disconnected or request.finished:
                return
            if _wants_ndjson(request, params) and self.rows_key in document:
                rows = document.pop(self.rows_key)
                _write_ndjson(request, rows, document)
            else:
                _write_json(request, 200, document)

        def failed(failure):
            if request._disconnected or request.finished:
                return
            if failure.check(QueryError):
                error = failure.value
                _write_json(request, error.status, {"error": error.error, "hint": error.hint})
                return
            self.log.failure("Query failed", failure)
            _write_json(request, 500, {"error": "the query failed", "hint": "see the daemon log"})

        d.addCallbacks(answer, failed)
        return NOT_DONE_YET


class QueryResource(Resource):
    """
    C{/api}: mount with C{admin_root.putChild(b"api", QueryResource(store, reactor))}.
    """

    def __init__(self, store, reactor=None, options: QueryOptions = QueryOptions()) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.store = store
        self.semaphore = defer.DeferredSemaphore(options.concurrency)
        self.engine = QueryEngine(store.view, options)
        v1 = Resource()
        self.putChild(b"v1", v1)
        engine = self.engine
        v1.putChild(b"records", _QueryLeaf(self, lambda _, p: engine.records(p), "records"))
        v1.putChild(b"logs", _QueryLeaf(self, lambda _, p: engine.logs(p), "items"))
        v1.putChild(b"events", _QueryLeaf(self, lambda _, p: engine.events(p), "items"))
        v1.putChild(b"traces", _QueryLeaf(self, engine.trace, "spans", "trace_id"))
        v1.putChild(b"metrics", _QueryLeaf(self, engine.metric, "points", "name"))
