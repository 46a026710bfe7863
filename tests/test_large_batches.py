"""
Large request bodies: decoding and record encoding in threads, the orjson
decoder with its fallback to C{json}, and building items from log batches.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import threading

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from reductrai.config import load_settings
from reductrai.dictionaries import CURRENT_PREFIX, DICTS_DB, META_DB, Dictionary, encode_dictionary, id_key, train
from reductrai.formats import datadog
from reductrai.formats.items import LOG, METRIC, Item, PayloadContext, PayloadError
from reductrai.formats.json_text import loads
from reductrai.indexes import INDEX_DB, INDEX_REV_DB, index_ops
from reductrai.metrics import Metrics
from reductrai.record import RecordCodec
from reductrai.resource import IngestResource
from reductrai.store import RecordStore, StoreError, StoreOptions
from reductrai.vendors.registry import default_router
from tests.support import FakeIngestRequest

FIELDS = dict(
    vendor="datadog", kind="logs", route="logs_v2", method="POST", path="/api/v2/logs",
    query="", content_type="application/json", content_encoding="gzip", wire_size=0, headers=[],
)
LOGS_CONTEXT = PayloadContext(path="/api/v2/logs", content_type="application/json")


def log_batch(count: int, seed: int = 1) -> bytes:
    """
    A Datadog logs JSON array of C{count} varied entries.
    """
    rng = random.Random(seed)
    words = "alpha beta gamma delta order cart payment refund token queue cache".split()
    entries = [
        {
            "ddsource": "python",
            "ddtags": f"env:test,version:1.{rng.randrange(9)}",
            "hostname": f"host-{rng.randrange(4)}",
            "service": rng.choice(("checkout", "cart")),
            "status": rng.choice(("info", "warn", "error")),
            "message": f"{rng.randrange(10**9)} " + " ".join(rng.choice(words) for _ in range(12)),
        }
        for _ in range(count)
    ]
    return json.dumps(entries, separators=(",", ":")).encode()


class ManualRunner:
    """
    A C{run_in_thread} whose calls wait until the test finishes them; a
    finished call runs its function in a real thread.
    """

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, f, *args) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def finish(self, index: int) -> None:
        f, args, d = self.calls[index]
        outcome: list = []

        def run() -> None:
            try:
                outcome.append(f(*args))
            except BaseException:
                outcome.append(Failure())

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        if isinstance(outcome[0], Failure):
            d.errback(outcome[0])
        else:
            d.callback(outcome[0])

    def fail(self, index: int, error: Exception) -> None:
        self.calls[index][2].errback(error)


class ThreadRunner(ManualRunner):
    """
    A C{run_in_thread} that runs each call at once in a real thread.
    """

    def __call__(self, f, *args) -> defer.Deferred:
        d = super().__call__(f, *args)
        self.finish(len(self.calls) - 1)
        return d


def open_store(path, runner, **options) -> tuple[RecordStore, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    store = RecordStore(StoreOptions(path=str(path), durability="none", **options), reactor, run_in_thread=runner)
    store.open()
    return store, reactor


def stored_records(store: RecordStore) -> list[tuple[bytes, bytes]]:
    """
    Return every record's key and decoded body, in key order.
    """
    codec = RecordCodec(dictionary_lookup=store.dictionaries.data.get)
    with store.env.begin(db=store._records) as txn:
        return [(bytes(key), codec.decode(bytes(value))[1]) for key, value in txn.cursor()]


# -- records encoded in threads ------------------------------------------------------


def test_small_record_waits_for_large_one(tmp_path):
    """
    A large body is encoded through the runner.  A small record appended
    after it is committed only once the large one is encoded, in key order
    and in one transaction with the small record's extra operation.
    """
    runner = ManualRunner()
    store, reactor = open_store(tmp_path / "store", runner)
    large = log_batch(800)
    assert len(large) >= store.options.offload_bytes
    keys: list = []
    store.append(FIELDS, large).addCallback(keys.append)
    store.append(FIELDS, b"[]", extra=[("put", b"side", lambda key: key, b"v")]).addCallback(keys.append)
    reactor.advance(0)
    assert len(runner.calls) == 1
    assert keys == []
    assert store.commits == 0

    runner.finish(0)
    reactor.advance(0)
    assert len(keys) == 2
    assert keys[0] < keys[1]
    assert store.commits == 1
    assert stored_records(store) == [(keys[0], large), (keys[1], b"[]")]
    with store.env.begin() as txn:
        assert txn.get(keys[1], db=store.database(b"side")) == b"v"


def test_out_of_order_encodings_commit_in_order(tmp_path):
    """
    Three large records whose encodings finish last to first are committed
    only when the first is done, in the order they were appended.
    """
    runner = ManualRunner()
    store, reactor = open_store(tmp_path / "store", runner)
    bodies = [log_batch(700, seed) for seed in (1, 2, 3)]
    keys: list = []
    for body in bodies:
        store.append(FIELDS, body).addCallback(keys.append)
    runner.finish(2)
    runner.finish(1)
    reactor.advance(0)
    assert keys == []
    runner.finish(0)
    reactor.advance(0)
    assert len(keys) == 3
    assert keys == sorted(keys)
    assert stored_records(store) == list(zip(keys, bodies))


def test_failed_encoding_fails_its_record(tmp_path):
    """
    When a thread fails, that record's Deferred fails with L{StoreError}
    and its operations are dropped; the records after it are committed.
    """
    runner = ManualRunner()
    store, reactor = open_store(tmp_path / "store", runner)
    results: list = []
    store.append(FIELDS, log_batch(800), extra=[("put", b"side", b"lost", b"v")]).addBoth(results.append)
    store.append(FIELDS, b"[1]").addBoth(results.append)
    runner.fail(0, RuntimeError("no memory"))
    reactor.advance(0)
    assert len(results) == 2
    assert isinstance(results[0], Failure) and results[0].check(StoreError)
    assert isinstance(results[1], bytes)
    assert stored_records(store) == [(results[1], b"[1]")]
    with store.env.begin() as txn:
        # Named databases are keys of the main one: "side" was never created.
        assert b"side" not in [bytes(name) for name in txn.cursor().iternext(values=False)]


def test_close_waits_for_encodings(tmp_path):
    """
    C{close()} fires only after the records being encoded are committed;
    they are in the store when it is opened again.
    """
    runner = ManualRunner()
    store, reactor = open_store(tmp_path / "store", runner)
    body = log_batch(800)
    keys: list = []
    store.append(FIELDS, body).addCallback(keys.append)
    closed: list = []
    store.close().addCallback(closed.append)
    assert closed == []
    assert store.is_open
    runner.finish(0)
    reactor.advance(0)
    assert len(keys) == 1
    assert closed == [None]
    assert not store.is_open

    reopened, _ = open_store(tmp_path / "store", None)
    assert stored_records(reopened) == [(keys[0], body)]
    reopened.close()


def _seed_dictionary(path, stream: str, dictionary_id: int, data: bytes) -> None:
    """
    Store a dictionary as a training does, as the current one of C{stream}.
    """
    store, reactor = open_store(path, None)
    dictionary = Dictionary(dictionary_id, stream, 1, 100, data)
    store.submit([
        ("put", DICTS_DB, id_key(dictionary_id), encode_dictionary(dictionary)),
        ("put", META_DB, CURRENT_PREFIX + stream.encode("utf-8"), id_key(dictionary_id)),
    ])
    reactor.advance(0)
    store.close()


def test_thread_encoding_matches_inline(tmp_path):
    """
    A record encoded in a thread, with the stream's trained dictionary, is
    byte for byte the record the reactor thread writes inline.
    """
    samples = [log_batch(3, seed) for seed in range(300)]
    data = train(samples, 16 * 1024)
    body = log_batch(900, seed=7)
    values = []
    for name, runner, offload in (("thread", ThreadRunner(), 64 * 1024), ("inline", None, 0)):
        path = tmp_path / name
        _seed_dictionary(path, "datadog/logs", 5, data)
        reactor = MemoryReactorClock()
        store = RecordStore(
            StoreOptions(path=str(path), durability="none", offload_bytes=offload),
            reactor, clock_ns=lambda: 1_796_400_000_000_000_000, run_in_thread=runner,
        )
        store.open()
        keys: list = []
        store.append(FIELDS, body).addCallback(keys.append)
        reactor.advance(0)
        assert len(runner.calls if runner else [None]) == 1
        with store.env.begin(db=store._records) as txn:
            value = bytes(txn.get(keys[0]))
        header, decoded = RecordCodec(dictionary_lookup=store.dictionaries.data.get).decode(value)
        assert header.dictionary == 5
        assert decoded == body
        values.append(value)
        store.close()
    assert values[0] == values[1]


@pytest_twisted.ensureDeferred
async def test_reactor_pool_round_trip(tmp_path):
    """
    With the reactor's own thread pool, interleaved large and small
    records are all committed, in the order they were appended.
    """
    from twisted.internet import reactor

    store = RecordStore(StoreOptions(path=str(tmp_path / "store"), durability="none"), reactor)
    store.open()
    try:
        bodies = [log_batch(600, seed) if seed % 2 == 0 else b'[{"message":"%d"}]' % seed for seed in range(8)]
        keys = await defer.gatherResults([store.append(FIELDS, body) for body in bodies])
        assert keys == sorted(keys)
        assert stored_records(store) == list(zip(keys, bodies))
    finally:
        await store.close()


# -- bodies decoded in threads -----------------------------------------------------




def _ingest(tmp_path, wire: bytes, encoding: bytes, runner, offload: int, overrides=None):
    """
    Send one Datadog logs request through a store-only L{IngestResource}.

    @return: the request (with its response written) and the store (open).
    """
    clock = Clock()
    store = RecordStore(StoreOptions(path=str(tmp_path), durability="none"), clock)
    store.open()
    settings = load_settings(None, environ={}, overrides={"proxy.mode": "store-only", **(overrides or {})})
    resource = IngestResource(
        default_router(), settings, "store-only", store, None, Metrics(),
        offload_decode_bytes=offload, run_in_thread=runner,
    )
    headers = {b"content-type": b"application/json", b"content-encoding": encoding, b"dd-api-key": b"0" * 32}
    request = FakeIngestRequest(b"/api/v2/logs", wire, headers)
    resource.render(request)
    clock.advance(0)
    return request, store


def test_large_body_decoded_in_thread(tmp_path):
    """
    A gzip log batch above the threshold is decoded through the runner,
    gets 202 and is stored decoded, with one item per log line.
    """
    decoded = log_batch(2000)
    wire = gzip.compress(decoded)
    runner = ThreadRunner()
    request, store = _ingest(tmp_path / "store", wire, b"gzip", runner, offload=16 * 1024)
    assert len(wire) >= 16 * 1024
    assert len(runner.calls) == 1
    assert request.responseCode == 202
    assert request.finished
    records = stored_records(store)
    assert [body for _, body in records] == [decoded]
    codec = RecordCodec()
    with store.env.begin(db=store._records) as txn:
        header = codec.decode_header(bytes(txn.get(records[0][0])))
    assert header.items == len(json.loads(decoded))
    store.close()


def _zstd_declaring(size: int) -> bytes:
    """
    A zstd frame header declaring C{size} content bytes, padded past the
    offload threshold.
    """
    import zstandard

    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"x" * size)
    return frame + os.urandom(20 * 1024)


@pytest.mark.parametrize(
    "wire, encoding, status, overrides",
    [
        (b"\x1f\x8b\x08\x00" + os.urandom(20 * 1024), b"gzip", 400, None),
        (os.urandom(20 * 1024), b"compress", 415, None),
        (_zstd_declaring(300_000), b"zstd", 413, {"limits.max_decoded_bytes": 200_000}),
    ],
    ids=["corrupt-gzip", "unsupported", "too-large"],
)
def test_thread_decoding_errors_match_inline(tmp_path, wire, encoding, status, overrides):
    """
    A body that cannot be decoded gets the same response whether it was
    decoded in a thread or inline: 400 corrupt, 415 unsupported, 413 over
    the cap.
    """
    answers = []
    for name, runner, offload in (("thread", ThreadRunner(), 16 * 1024), ("inline", None, 0)):
        request, store = _ingest(tmp_path / name, wire, encoding, runner, offload, overrides)
        if runner is not None:
            assert len(runner.calls) == 1
        assert request.finished
        answers.append((request.responseCode, b"".join(request.written)))
        assert stored_records(store) == []
        store.close()
    assert answers[0] == answers[1]
    assert answers[0][0] == status


def test_error_after_thread_decoding_answers_500(tmp_path):
    """
    An unexpected error raised while handling a request whose body was
    decoded in a thread is logged and answered with a 500, as twisted.web
    answers an error raised by C{render}; nothing is stored.
    """
    from twisted.logger import globalLogPublisher

    class Broken(IngestResource):
        def _ingest(self, *args):
            raise RuntimeError("broken after decoding")

    clock = Clock()
    store = RecordStore(StoreOptions(path=str(tmp_path / "store"), durability="none"), clock)
    store.open()
    settings = load_settings(None, environ={}, overrides={"proxy.mode": "store-only"})
    runner = ThreadRunner()
    resource = Broken(default_router(), settings, "store-only", store, None, Metrics(), run_in_thread=runner)
    headers = {b"content-type": b"application/json", b"content-encoding": b"gzip", b"dd-api-key": b"0" * 32}
    request = FakeIngestRequest(b"/api/v2/logs", gzip.compress(log_batch(2000)), headers)
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        resource.render(request)
        clock.advance(0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert len(runner.calls) == 1
    assert request.responseCode == 500
    assert request.finished
    failures = [event["log_failure"] for event in events if "log_failure" in event]
    assert [failure.getErrorMessage() for failure in failures] == ["broken after decoding"]
    assert stored_records(store) == []
    store.close()


# -- JSON decoding -----------------------------------------------------------------


_DOCUMENTS = [
    b'{"a":1,"b":[1.5,-2,"x"],"c":{"d":null,"e":true}}',
    b'[18446744073709551615, -9223372036854775808]',
    b'[18446744073709551616, -9223372036854775809, 340282366920938463463374607431768211456]',
    b'{"deep":{"n":[1,{"m":123456789012345678901234567890}]}}',
    b'{"id":"1234567890123456789012","n":12}',
    b'[1e19, -1e19, 1.5e300]',
    b'[1e400, -1e400, 1e-400]',
    b'[NaN, Infinity, -Infinity]',
    b'"\\ud800"',
    b'"\xed\xa0\x80"',
    b'"\\ud83d\\ude00"',
    b'\xef\xbb\xbf{"a":1}',
    '{"a":[1,"\u00e9"]}'.encode("utf-16"),
    b'{"a":1,"b":2,"a":3}',
    b" [1] \n",
    b"[" * 2000 + b"]" * 2000,
    b"[1,]",
    b"",
    b"{",
    b'{"a":1} x',
    b'"\xff"',
    b'"a\x01"',
]


def _outcome(decode, data):
    try:
        return "ok", repr(decode(data))
    except RecursionError:
        return "recursion", None
    except ValueError as error:
        return type(error).__name__, str(error)


@pytest.mark.parametrize("data", _DOCUMENTS + [document.decode("utf-8", "surrogatepass") for document in _DOCUMENTS[:12]])
@pytest.mark.parametrize("reject_constants", [False, True])
def test_loads_matches_json(data, reject_constants):
    """
    L{loads} gives what C{json.loads} gives: the same value (exact wide
    integers, the last of repeated keys, surrogates, infinities) or the
    same error.
    """

    def reference(text):
        if reject_constants:
            def reject(name):
                raise ValueError(f"non-standard JSON constant {name}")

            return json.loads(text, parse_constant=reject)
        return json.loads(text)

    assert _outcome(lambda text: loads(text, reject_constants=reject_constants), data) == _outcome(reference, data)


def test_logs_keep_wide_integers():
    """
    Log attributes beyond 64 bits keep every digit in their tags, and a
    lone surrogate in a message is kept as the JSON encodes it.
    """
    body = (
        b'[{"message":"\\ud800 x","big":18446744073709551616,"neg":-9223372036854775809,'
        b'"float":1.5,"n":{"wide":123456789012345678901}}]'
    )
    (item,) = datadog.parse_logs_v2(body, LOGS_CONTEXT).items
    assert item.message == "\ud800 x"
    assert item.tags == {
        "big": "18446744073709551616",
        "neg": "-9223372036854775809",
        "float": "1.5",
        "n.wide": "123456789012345678901",
    }


@pytest.mark.parametrize("body", [b'[{"message":"a","n":NaN}]', b'[{"message":"a"},]', b"\xff"])
def test_invalid_log_json_rejected(body):
    """
    What C{json} rejected (C{NaN}, a trailing comma, bytes that are not
    text) is still an invalid payload.
    """
    with pytest.raises(PayloadError) as raised:
        datadog.parse_logs_v2(body, LOGS_CONTEXT)
    assert raised.value.reason == "invalid JSON"


# -- log items and their index terms -------------------------------------------------


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"ddtags": 1, "ddsource": 1, "hostname": 1}, "log 0 ddtags must be a string"),
        ({"ddsource": 1, "hostname": 1, "status": 1}, "log 0 ddsource must be a string"),
        ({"hostname": 1, "status": 1, "service": 1}, "log 0 hostname must be a string"),
        ({"host": 1, "status": 1}, "log 0 hostname must be a string"),
        ({"status": 1, "service": 1, "timestamp": "x"}, "log 0 status must be a string"),
        ({"service": 1, "timestamp": "x"}, "log 0 service must be a string"),
        ({"timestamp": "x"}, "log timestamp is not an ISO 8601 date-time"),
    ],
)
def test_log_field_error_order(record, reason):
    """
    A log with several invalid fields is refused for the first of ddtags,
    ddsource, hostname, status, service and timestamp.
    """
    with pytest.raises(PayloadError) as raised:
        datadog.parse_logs_v2(json.dumps([record]).encode(), LOGS_CONTEXT)
    assert raised.value.reason == reason


def test_log_item_fields_and_tags():
    """
    Query tags, then the log's ddtags (repeated keys joined, empty values
    add nothing to a known key), its source and its other attributes
    (the trace and span ids included) make the tags.  A null hostname
    means no host, even with a host field.
    """
    context = PayloadContext(path="/api/v2/logs", query={"ddtags": ["env:q,team:a"]})
    record = {
        "ddtags": "team:b,solo, team: ,version:2,env:",
        "ddsource": "nginx",
        "hostname": None,
        "host": "ignored",
        "service": "",
        "status": "WARN",
        "timestamp": 1_796_400_000_123,
        "dd.trace_id": "255",
        "dd.span_id": "16",
        "message": {"text": "hi"},
        "attr": {"k": [1, 2]},
    }
    (item,) = datadog.parse_logs_v2(json.dumps([record]).encode(), context).items
    assert item == Item(
        kind=LOG,
        index=0,
        timestamp_ns=1_796_400_000_123_000_000,
        service=None,
        host=None,
        level="warn",
        trace_id="0" * 30 + "ff",
        span_id="0" * 14 + "10",
        message='{"text":"hi"}',
        tags={
            "env": "q", "team": "a,b", "solo": "", "version": "2", "source": "nginx",
            "dd.trace_id": "255", "dd.span_id": "16", "attr.k": "[1,2]",
        },
    )


def test_index_terms_once_each():
    """
    Items repeating a few services and hosts give one index key per
    distinct term, plus metric names and trace ids, and the reverse entry
    lists them all.
    """
    key = b"K" * 12
    items = [
        Item(kind=LOG, index=index, service=("a", "b")[index % 2], host="h", trace_id="0" * 31 + "1")
        for index in range(1000)
    ] + [Item(kind=METRIC, index=1000, name="cpu", service="a"), Item(kind=LOG, index=1001, name="not-a-metric")]
    ops = index_ops(key, items)
    expected = sorted([b"sa\x00" + key, b"sb\x00" + key, b"hh\x00" + key, b"mcpu\x00" + key,
                       b"t" + b"0" * 31 + b"1\x00" + key])
    assert [op for op in ops if op[1] == INDEX_DB] == [("put", INDEX_DB, index_key, b"") for index_key in expected]
    (reverse,) = [op for op in ops if op[1] == INDEX_REV_DB]
    assert reverse[2] == key
    assert reverse[3] == b"".join(len(k).to_bytes(2, "big") + k for k in expected)


def test_repeated_ddtags_tags_stay_apart():
    """
    Logs sharing one C{ddtags} string each get their own tags: an
    attribute that overrides a tag of one log leaves the next log's alone.
    """
    context = PayloadContext(path="/api/v2/logs", query={"ddtags": ["team:q"]})
    records = [
        {"ddtags": "env:a,team:b", "env": "override", "ddsource": "x"},
        {"ddtags": "env:a,team:b"},
        {"ddtags": "env:a,team:b", "team": "solo"},
    ]
    items = datadog.parse_logs_v2(json.dumps(records).encode(), context).items
    assert items[0].tags == {"team": "q,b", "env": "override", "source": "x"}
    assert items[1].tags == {"team": "q,b", "env": "a"}
    assert items[2].tags == {"team": "solo", "env": "a"}
