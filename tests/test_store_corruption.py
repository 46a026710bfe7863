"""
A flipped byte in a hot record or in a block is reported by
C{reductrai-inspect verify} and by the query that reaches it; the store and
the query API keep serving everything else.
"""

from __future__ import annotations

import json
from pathlib import Path

import lmdb
import pytest_twisted
from twisted.internet import reactor

from reductrai.compactor import Compactor, CompactorOptions
from reductrai.query import Params, QueryEngine
from reductrai.store import BLOCK_DATA_DB, RECORDS_DB, RecordStore, StoreOptions


def fields(kind: str) -> dict:
    return {"vendor": "datadog", "kind": kind, "route": "r", "method": "POST", "path": "/p", "query": "",
            "content_type": "application/json", "content_encoding": None, "wire_size": 1, "headers": []}


def flip_last_byte(env, db_name: bytes, key: bytes) -> None:
    db = env.open_db(db_name)
    with env.begin(write=True, db=db) as txn:
        value = bytearray(txn.get(key))
        value[-5] ^= 0xFF
        txn.put(key, bytes(value))


@pytest_twisted.ensureDeferred
async def test_flipped_bytes_are_reported(tmp_path: Path, capsys):
    store = RecordStore(StoreOptions(path=str(tmp_path / "store"), durability="none"), reactor)
    store.open()
    bodies = {}
    try:
        for n in range(40):
            body = json.dumps({"n": n, "message": "request %d" % n}).encode()
            bodies[await store.append(fields("metrics" if n < 20 else "logs"), body)] = body
        compactor = Compactor(store, reactor, CompactorOptions(min_age=0))
        await compactor.compact_all()
        # Twenty more hot records after packing.
        hot = []
        for n in range(40, 60):
            body = json.dumps({"n": n}).encode()
            key = await store.append(fields("logs"), body)
            bodies[key] = body
            hot.append(key)
        view = store.view()
        with view.begin() as txn:
            blocks = list(view.all_blocks(txn))
        metrics_block = next(b for b in blocks if b.stream == "datadog/metrics")
        flip_last_byte(store.env, RECORDS_DB, hot[3])
        flip_last_byte(store.env, BLOCK_DATA_DB, metrics_block.key)

        engine = QueryEngine(store.view)
        document = engine.records(Params({b"limit": [b"1000"], b"include": [b"body_base64"]}))
        broken = {e["key"] for e in document["errors"]}
        assert len(document["errors"]) == 2, document["errors"]
        assert any("block" in e["error"] for e in document["errors"])
        import base64

        returned = {r["key"]: base64.b64decode(r["body_base64"]) for r in document["records"]}
        # Everything outside the two corrupt places comes back intact.
        expected = {f"{int.from_bytes(k[:8], 'big')}-{int.from_bytes(k[8:], 'big')}": b for k, b in bodies.items()
                    if k != hot[3] and not (metrics_block.first_key <= k <= metrics_block.last_key)}
        assert returned == expected
        assert broken

        # The store still accepts writes.
        await store.append(fields("logs"), b"after")
        store.env.sync(True)
        # A separate process, as an operator runs it beside the daemon.
        import subprocess
        import sys

        from twisted.internet import threads

        result = await threads.deferToThread(
            subprocess.run,
            [sys.executable, "-m", "reductrai.inspect", "--data-dir", str(tmp_path), "verify", "--json", "--progress"],
            capture_output=True, timeout=60,
        )
        report = json.loads(result.stdout)
        assert result.returncode == 1
        assert b"verify [" in result.stderr
        assert report["corrupt"] == 2
        assert {p.get("block") is not None for p in report["problems"]} == {True, False}
    finally:
        await store.close()
