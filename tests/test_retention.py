"""
Retention deletes exactly what is due, also while records keep arriving,
and never touches the spool's database.
"""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
from twisted.internet import reactor, task

from reductrai.compactor import Compactor, CompactorOptions
from reductrai.retention import Retention, RetentionOptions
from reductrai.store import RecordStore, StoreOptions

SECOND = 1_000_000_000


class FakeClock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def fields(kind: str) -> dict:
    return {"vendor": "datadog", "kind": kind, "route": "r", "method": "POST", "path": "/p", "query": "",
            "content_type": "application/json", "content_encoding": None, "wire_size": 1, "headers": []}


def visible_keys(store) -> list[bytes]:
    view = store.view()
    with view.begin() as txn:
        return [entry.key for entry in view.scan(txn)]


@pytest_twisted.ensureDeferred
async def test_max_age_deletes_exactly_what_is_due_under_ingest(tmp_path: Path):
    clock = FakeClock(1_000_000 * SECOND)
    store = RecordStore(StoreOptions(path=str(tmp_path / "store"), durability="none"), reactor, clock_ns=clock)
    store.open()
    try:
        await store.submit([("put", b"spool", b"entry-1", b"undelivered")])
        keys = []
        for second in range(100):
            clock.now = (1_000_000 + second) * SECOND
            keys.append(await store.append(fields("logs" if second % 2 else "metrics"), b'{"n":%d}' % second))
        # Pack the first half so retention meets blocks and hot records.
        compactor = Compactor(store, reactor, CompactorOptions(min_age=50, block_max_seconds=10), clock_ns=clock)
        await compactor.compact_all(min_age=50)
        assert store.status()["blocks"] > 0

        retention = Retention(store, reactor, RetentionOptions(max_age=30, batch=7), clock_ns=clock)
        clock.now = (1_000_000 + 100) * SECOND
        cutoff = clock.now - 30 * SECOND
        passes = 0
        while True:
            # New records arrive between passes.
            clock.now += SECOND // 10
            keys.append(await store.append(fields("logs"), b"late"))
            cutoff = clock.now - 30 * SECOND
            result = await retention.run_pass()
            passes += 1
            if not result.deleted:
                break
        assert passes > 2, "batches are bounded"
        expected = [key for key in keys if int.from_bytes(key[:8], "big") >= cutoff]
        assert visible_keys(store) == expected
        view = store.view()
        with view.begin() as txn:
            for block in view.all_blocks(txn):
                assert block.last_ns >= cutoff
            assert txn.get(b"entry-1", db=store.database(b"spool")) == b"undelivered"
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_max_bytes_deletes_oldest_first(tmp_path: Path):
    import os

    clock = FakeClock(2_000_000 * SECOND)
    store = RecordStore(StoreOptions(path=str(tmp_path / "store"), durability="none", use_dictionaries=False),
                        reactor, clock_ns=clock)
    store.open()
    try:
        keys = []
        for n in range(300):
            clock.now += SECOND
            keys.append(await store.append(fields("logs"), os.urandom(2000)))
        used = store.status()["data_bytes"]
        retention = Retention(store, reactor, RetentionOptions(max_age=0, max_bytes=used // 2, batch=20),
                              clock_ns=clock)
        for _ in range(100):
            result = await retention.run_pass()
            if not result.deleted:
                break
        remaining = visible_keys(store)
        assert store.status()["data_bytes"] <= used // 2
        assert remaining, "only what exceeds the limit goes"
        assert remaining == keys[len(keys) - len(remaining):], "the oldest went first"
    finally:
        await store.close()
