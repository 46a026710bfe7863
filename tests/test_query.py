"""
Item queries: logs by service, level and substring; metrics with tag
filters and step aggregation; events; limits that answer 400 and 413 with
a hint; NDJSON over HTTP.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from reductrai.formats.datadog import parse_events_v1, parse_logs_v2, parse_series_v1
from reductrai.formats.items import PayloadContext
from reductrai.query import Params, QueryEngine, QueryError, QueryOptions, QueryResource
from reductrai.store import RecordStore, StoreOptions
from tests.support import send_raw

BASE_S = 1_796_000_000


def fields(kind: str, route: str, path: str) -> dict:
    return {"vendor": "datadog", "kind": kind, "route": route, "method": "POST", "path": path, "query": "",
            "content_type": "application/json", "content_encoding": None, "wire_size": 1, "headers": []}


LOGS = [
    {"message": f"line {n} {'boom' if n % 5 == 0 else 'fine'}", "service": f"svc-{n % 3}", "hostname": f"h{n % 2}",
     "status": "error" if n % 4 == 0 else "info", "timestamp": (BASE_S + n * 60) * 1000}
    for n in range(60)
]
SERIES = [
    {"metric": "cpu", "type": "gauge", "points": [[BASE_S + n * 10, float(n)]], "tags": [f"env:{'prod' if n % 2 else 'dev'}"],
     "host": "h1"}
    for n in range(60)
]


def params(**values) -> Params:
    return Params({k.encode(): [v.encode()] for k, v in values.items()})


@pytest.fixture
def store(tmp_path: Path):
    # Requests arrive when their items were made: item queries look at
    # records that arrived within QueryOptions.skew of the range.
    store = RecordStore(StoreOptions(path=str(tmp_path / "store"), durability="none"), reactor,
                        clock_ns=lambda: (BASE_S + 30) * 1_000_000_000)
    store.open()
    yield store
    store.close()


async def fill(store) -> None:
    context = PayloadContext(path="/api/v2/logs")
    for start in range(0, 60, 10):
        body = json.dumps(LOGS[start : start + 10]).encode()
        await store.append(fields("logs", "logs_v2", "/api/v2/logs"), body, items=parse_logs_v2(body, context).items)
    body = json.dumps({"series": SERIES}).encode()
    await store.append(fields("metrics", "series_v1", "/api/v1/series"), body,
                       items=parse_series_v1(body, PayloadContext(path="/api/v1/series")).items)
    body = json.dumps({"title": "deploy", "text": "deployed boom", "host": "h1"}).encode()
    await store.append(fields("events", "events_v1", "/api/v1/events"), body,
                       items=parse_events_v1(body, PayloadContext(path="/api/v1/events")).items)


@pytest_twisted.ensureDeferred
async def test_logs_filters(store):
    await fill(store)
    engine = QueryEngine(store.view)
    window = {"from": str(BASE_S), "to": str(BASE_S + 30 * 60)}
    found = engine.logs(params(service="svc-1", **window))["items"]
    assert [i["message"] for i in found] == [l["message"] for l in LOGS[:30] if l["service"] == "svc-1"]
    found = engine.logs(params(level="error", q="boom", **window))["items"]
    assert [i["message"] for i in found] == [
        l["message"] for l in LOGS[:30] if l["status"] == "error" and "boom" in l["message"]
    ]
    # Paging with the cursor returns every match once.
    seen, cursor = [], None
    while True:
        extra = {"cursor": cursor} if cursor else {}
        page = engine.logs(params(limit="7", **extra))
        seen += [i["message"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [l["message"] for l in LOGS]


@pytest_twisted.ensureDeferred
async def test_metric_tags_and_step(store):
    await fill(store)
    engine = QueryEngine(store.view)
    document = engine.metric("cpu", params(tag="env:prod", step="60", agg="sum"))
    expected: dict[int, float] = {}
    for series in SERIES:
        if "env:prod" in series["tags"]:
            moment, value = series["points"][0]
            expected[moment - moment % 60] = expected.get(moment - moment % 60, 0.0) + value
    assert [b["value"] for b in document["buckets"]] == [expected[k] for k in sorted(expected)]
    points = engine.metric("cpu", params())["points"]
    assert len(points) == len(SERIES)


@pytest_twisted.ensureDeferred
async def test_events_and_limits(store):
    await fill(store)
    engine = QueryEngine(store.view, QueryOptions(max_examined=3, max_limit=50, default_limit=10))
    with pytest.raises(QueryError) as raised:
        engine.logs(params(limit="50"))
    assert raised.value.status == 413
    assert "from and to" in raised.value.hint
    with pytest.raises(QueryError) as raised:
        engine.records(params(limit="51"))
    assert raised.value.status == 400
    events = QueryEngine(store.view).events(params(q="boom"))["items"]
    assert [e["name"] for e in events] == ["deploy"]


@pytest_twisted.ensureDeferred
async def test_http_ndjson_and_errors(store):
    await fill(store)
    root = Resource()
    root.putChild(b"api", QueryResource(store, reactor, QueryOptions(max_examined=2)))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    try:
        number = port.getHost().port
        status, headers, body = await send_raw(number, "GET", "/api/v1/records?limit=1&format=ndjson",
                                               [("Host", "127.0.0.1")], b"")
        assert status == 200
        lines = [json.loads(line) for line in body.splitlines()]
        assert len(lines) == 2
        assert lines[-1]["next_cursor"]
        status, _, body = await send_raw(number, "GET", "/api/v1/logs?limit=100", [("Host", "127.0.0.1")], b"")
        assert status == 413
        assert json.loads(body)["hint"]
        status, _, body = await send_raw(number, "GET", "/api/v1/records?from=yesterday", [("Host", "127.0.0.1")], b"")
        assert status == 400
    finally:
        await port.stopListening()
