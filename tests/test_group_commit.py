"""
The LMDB record store: group commits, keys, growth and the record format.
"""

from __future__ import annotations

import zlib

import pytest
from twisted.internet.testing import MemoryReactorClock

from reductrai.record import RecordCodec, RecordError, RecordHeader, key_from_text, key_to_text, split_key
from reductrai.store import RecordStore, StoreFull, StoreOptions

FIELDS = dict(
    vendor="datadog", kind="metrics", route="series_v2", method="POST", path="/api/v2/series",
    query="", content_type="application/json", content_encoding=None, wire_size=0, headers=[],
)


def open_store(tmp_path, **options) -> tuple[RecordStore, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    store = RecordStore(StoreOptions(path=str(tmp_path / "store"), durability="none", **options), reactor)
    store.open()
    return store, reactor


def test_one_commit_per_reactor_turn(tmp_path):
    """
    Records appended in one turn commit together in one transaction.
    """
    store, reactor = open_store(tmp_path)
    keys = []
    for index in range(5):
        store.append(FIELDS, b'{"n":%d}' % index).addCallback(keys.append)
    assert keys == []
    reactor.advance(0)
    assert len(keys) == 5
    assert store.commits == 1
    assert keys == sorted(keys)
    store.append(FIELDS, b"{}")
    reactor.advance(0)
    assert store.commits == 2
    assert store.status()["records"] == 6


def test_keys_strictly_increase_with_equal_clock(tmp_path):
    """
    Keys stay unique and ordered when the clock does not move: the arrival
    time is the clock's millisecond and the sequence orders the records.
    """
    reactor = MemoryReactorClock()
    store = RecordStore(
        StoreOptions(path=str(tmp_path / "s"), durability="none"), reactor, clock_ns=lambda: 5_123_456_789
    )
    keys = [store.next_key() for _ in range(3)]
    assert [split_key(k)[0] for k in keys] == [5_123_000_000] * 3
    assert [split_key(k)[1] for k in keys] == [1, 2, 3]
    assert keys == sorted(set(keys))
    assert key_from_text(key_to_text(keys[1])) == keys[1]


def test_keys_increase_clock_back_or_wrap(tmp_path):
    """
    A clock that steps back keeps the last arrival time, and a sequence
    that wraps within one millisecond moves the time on by a millisecond,
    so keys still increase.
    """
    times = iter([9_000_000_000, 8_000_000_000, 8_000_000_000])
    store = RecordStore(
        StoreOptions(path=str(tmp_path / "s"), durability="none"), MemoryReactorClock(), clock_ns=lambda: next(times)
    )
    first = store.next_key()
    second = store.next_key()
    store._sequence = 0xFFFFFFFF
    third = store.next_key()
    assert first < second < third
    assert split_key(second)[0] == 9_000_000_000
    assert split_key(third) == (9_001_000_000, 0)


def test_map_grows_then_reports_full(tmp_path):
    """
    A full map doubles up to the maximum; past it appends fail with
    StoreFull and earlier records stay readable.
    """
    store, reactor = open_store(tmp_path, map_size=1 << 20, max_map_size=4 << 20)
    import os

    results = []
    for _ in range(40):
        store.append(FIELDS, os.urandom(200_000)).addCallbacks(results.append, results.append)
        reactor.advance(0)
    assert store.map_size == 4 << 20
    failures = [r for r in results if not isinstance(r, bytes)]
    successes = [r for r in results if isinstance(r, bytes)]
    assert failures and successes
    assert all(f.check(StoreFull) for f in failures)
    codec = RecordCodec()
    with store.env.begin(db=store._records) as txn:
        for key in successes:
            header, body = codec.decode(txn.get(key))
            assert header.size == 200_000
            assert zlib.crc32(body) == header.crc32


def test_extra_operations_commit_with_record(tmp_path):
    """
    Operations passed with a record land in the same commit, and callable
    values receive the record key.
    """
    store, reactor = open_store(tmp_path)
    keys = []
    store.append(FIELDS, b"x", extra=[("put", b"side", lambda key: key, b"v")]).addCallback(keys.append)
    reactor.advance(0)
    assert store.commits == 1
    with store.env.begin() as txn:
        assert txn.get(keys[0], db=store.database(b"side")) == b"v"


def test_codec_detects_corruption():
    """
    A flipped byte in the body or header is reported, never returned.
    """
    codec = RecordCodec()
    body = b'{"series":[' + b"1," * 500 + b"1]}"
    header = RecordHeader(received_ns=1, size=len(body), crc32=zlib.crc32(body), **FIELDS)
    value = bytearray(codec.encode(header, body))
    assert codec.decode(bytes(value)) == (header, body)
    flipped = bytearray(value)
    flipped[-5] ^= 0x40
    with pytest.raises(RecordError):
        codec.decode(bytes(flipped))
    with pytest.raises(RecordError):
        codec.decode(bytes(value[:10]))
    broken = bytearray(value)
    broken[0] = 9
    with pytest.raises(RecordError):
        codec.decode(bytes(broken))


def test_files_are_private(tmp_path):
    """
    The environment's files are created with mode 0600.
    """
    store, reactor = open_store(tmp_path)
    store.append(FIELDS, b"{}")
    reactor.advance(0)
    for name in ("data.mdb", "lock.mdb"):
        mode = (tmp_path / "store" / name).stat().st_mode & 0o777
        assert mode == 0o600, (name, oct(mode))
