"""
Micro-benchmarks of the per-request hot path, with pytest-benchmark.

Each test times one step (routing, decoding, record encoding, an LMDB
group commit, a whole request through L{IngestResource}) and checks its
result, so they run as ordinary tests in CI: with C{--benchmark-disable}
every benchmarked function runs once.  No test asserts a time.

    /work/venv/bin/python -m pytest -q tests/test_microbench.py --benchmark-disable
    /work/venv/bin/python -m pytest -q tests/test_microbench.py --benchmark-only
"""

from __future__ import annotations

import gzip
import json
import zlib

import attrs
import pytest
from twisted.internet.task import Clock
from twisted.web.server import NOT_DONE_YET

from reductrai.config import load_settings
from reductrai.encoding import decode_body
from reductrai.metrics import Metrics
from reductrai.record import RecordCodec, RecordHeader
from reductrai.resource import IngestResource
from reductrai.store import RecordStore, StoreOptions
from reductrai.vendors.registry import default_router
from tests.support import FakeIngestRequest

pytest.importorskip("pytest_benchmark")

SERIES_BODY = json.dumps(
    {
        "series": [
            {
                "metric": f"bench.request.latency.p{index}",
                "type": 3,
                "points": [{"timestamp": 1796400000 + index, "value": index * 1.5}],
                "resources": [{"name": "fake-host-01", "type": "host"}],
                "tags": ["env:bench", "service:fake-checkout", f"shard:{index}"],
            }
            for index in range(10)
        ]
    },
    separators=(",", ":"),
).encode()


def _header_fields(body: bytes) -> dict:
    """
    The header fields the resource gives L{RecordStore.append} for a
    Datadog series request.
    """
    return {
        "vendor": "datadog",
        "kind": "metrics",
        "route": "series_v2",
        "method": "POST",
        "path": "/api/v2/series",
        "query": "",
        "content_type": "application/json",
        "content_encoding": None,
        "wire_size": len(body),
        "headers": [["user-agent", "bench"]],
    }


def _store_options(path: str) -> StoreOptions:
    """
    Store options for the commit benchmark: no syncing (the cost measured
    is the transaction, not the disk) and no dictionary training, where the
    store has it, so that 100 appends are always one plain group commit.
    """
    fields = attrs.fields_dict(StoreOptions)
    extra = {"use_dictionaries": False} if "use_dictionaries" in fields else {}
    return StoreOptions(path=path, map_size=64 << 20, durability="none", **extra)


def test_router_match(benchmark):
    """
    L{Router.match} finds the series route by its exact path.
    """
    router = default_router()
    match = benchmark(router.match, "/api/v2/series")
    assert match is not None
    assert match.route.path == "/api/v2/series"
    assert match.vendor.name == "datadog"


def test_router_match_prefix(benchmark):
    """
    A path served by a prefix route (the Datadog logs intake with a key in
    the path) walks the prefix list.
    """
    router = default_router()
    match = benchmark(router.match, "/v1/input/0123456789abcdef0123456789abcdef")
    assert match is not None
    assert "/v1/input/0123456789abcdef0123456789abcdef".startswith(match.route.path)
    assert match.route.prefix


def test_decode_gzip_small(benchmark):
    """
    L{decode_body} undoes gzip on a small series body.
    """
    wire = gzip.compress(SERIES_BODY)
    decoded = benchmark(decode_body, wire, "gzip", 1 << 20)
    assert len(decoded) == len(SERIES_BODY)
    assert decoded == SERIES_BODY


def test_decode_identity(benchmark):
    """
    An identity body passes through L{decode_body} unchanged.
    """
    decoded = benchmark(decode_body, SERIES_BODY, None, 1 << 20)
    assert decoded == SERIES_BODY


def test_record_encode(benchmark):
    """
    L{RecordCodec.encode} builds a value that decodes back to the body.
    """
    codec = RecordCodec(3)
    header = RecordHeader(
        received_ns=1796400000 * 10**9, size=len(SERIES_BODY), crc32=zlib.crc32(SERIES_BODY),
        **_header_fields(SERIES_BODY),
    )
    value = benchmark(codec.encode, header, SERIES_BODY)
    decoded_header, body = RecordCodec(3).decode(value)
    assert body == SERIES_BODY
    assert decoded_header.size == len(SERIES_BODY)
    assert len(value) < len(SERIES_BODY)


def test_store_batch_commit(benchmark, tmp_path):
    """
    100 appends followed by one group commit on a real LMDB environment;
    every append's Deferred fires with a distinct key.
    """
    counter = iter(range(10**6))
    fields = _header_fields(SERIES_BODY)

    def setup():
        clock = Clock()
        store = RecordStore(_store_options(str(tmp_path / f"store-{next(counter)}")), clock)
        store.open()
        return (store, clock), {}

    outcome = {}

    def append_and_commit(store, clock):
        keys = []
        for _ in range(100):
            store.append(fields, SERIES_BODY).addCallback(keys.append)
        clock.advance(0)
        outcome["keys"] = keys
        outcome["store"] = store
        store.close()

    benchmark.pedantic(append_and_commit, setup=setup, rounds=5, iterations=1)
    keys = outcome["keys"]
    assert len(keys) == 100
    assert len(set(keys)) == 100
    assert keys == sorted(keys)




def test_ingest_request_store_only(benchmark, tmp_path):
    """
    One gzip series request through L{IngestResource} in store-only mode:
    routed, decoded, stored, committed, and the response is 202 with
    Datadog's body.
    """
    clock = Clock()
    store = RecordStore(_store_options(str(tmp_path / "store")), clock)
    store.open()
    settings = load_settings(None, environ={}, overrides={"proxy.mode": "store-only"})
    resource = IngestResource(default_router(), settings, "store-only", store, None, Metrics())
    wire = gzip.compress(SERIES_BODY)
    headers = {b"content-type": b"application/json", b"content-encoding": b"gzip", b"dd-api-key": b"0" * 32}

    def one_request():
        request = FakeIngestRequest(b"/api/v2/series", wire, headers)
        result = resource.render(request)
        clock.advance(0)
        return request, result

    request, result = benchmark(one_request)
    store.close()
    assert result is NOT_DONE_YET
    assert request.responseCode == 202
    assert json.loads(b"".join(request.written)) == {"errors": []}
    assert request.finished
    assert store.records_written >= 1
