"""
Every captured request stored, queried back through the query API with
identical decoded content: hot, after compaction, and after a backup and
restore.
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from pathlib import Path

import cramjam
import pytest
import pytest_twisted
import zstandard
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from reductrai.backup import backup, restore
from reductrai.compactor import Compactor, CompactorOptions
from reductrai.indexes import parse_record
from reductrai.query import QueryResource
from reductrai.record import RecordHeader
from reductrai.store import RecordStore, StoreOptions
from tests import corpus
from tests.support import send_raw


def api_site(store) -> Site:
    """
    The admin listener's layout: the query API under C{/api}.
    """
    root = Resource()
    root.putChild(b"api", QueryResource(store, reactor))
    site = Site(root)
    site.noisy = False
    return site


def decode_in_test(captured) -> bytes:
    """
    Undo a captured body's content encoding with the reference libraries,
    independently of reductrai.encoding.
    """
    encoding = (captured.header("content-encoding") or "").lower()
    body = captured.body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        try:
            return zlib.decompress(body)
        except zlib.error:
            return zlib.decompress(body, -15)
    if encoding in ("zstd", "zstd1"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    if encoding == "snappy":
        try:
            return bytes(cramjam.snappy.decompress_raw(body))
        except Exception:
            return bytes(cramjam.snappy.decompress(body))
    assert encoding == "", encoding
    return body


def header_fields(captured) -> dict:
    vendor = captured.folder.split("-")[0]
    kinds = {"logs": "logs", "metrics": "metrics", "traces": "traces", "events": "events"}
    path = captured.path
    kind = next((k for word, k in kinds.items() if word in path or word in captured.meta.get("variant", "")), "other")
    return {
        "vendor": vendor,
        "kind": kind,
        "route": captured.meta.get("variant", ""),
        "method": captured.method,
        "path": path,
        "query": captured.meta["query"],
        "content_type": captured.header("content-type"),
        "content_encoding": captured.header("content-encoding"),
        "wire_size": len(captured.body),
        "headers": [["user-agent", captured.header("user-agent") or ""]],
    }


async def get_json(port: int, target: str):
    status, _, body = await send_raw(port, "GET", target, [("Host", "127.0.0.1")], b"")
    return status, json.loads(body)


async def all_records(port: int) -> dict[str, bytes]:
    """
    Page through /api/v1/records and return key -> decoded body.
    """
    found: dict[str, bytes] = {}
    cursor = None
    while True:
        target = "/api/v1/records?limit=7&include=body_base64" + (f"&cursor={cursor}" if cursor else "")
        status, document = await get_json(port, target)
        assert status == 200, document
        assert document["errors"] == []
        for record in document["records"]:
            found[record["key"]] = base64.b64decode(record["body_base64"])
        cursor = document["next_cursor"]
        if cursor is None:
            return found


async def check_everything(port: int, expected: dict[str, bytes], spans: dict[str, int]) -> None:
    assert await all_records(port) == expected
    for trace_id, count in spans.items():
        status, document = await get_json(port, f"/api/v1/traces/{trace_id}")
        assert status == 200, document
        assert len(document["spans"]) == count


@pytest_twisted.ensureDeferred
async def test_round_trip_hot_packed_and_restored(tmp_path: Path):
    captured = list(corpus.load_all())
    assert {c.folder for c in captured} == set(corpus.folders())
    store = RecordStore(StoreOptions(path=str(tmp_path / "store"), durability="none"), reactor)
    store.open()
    port = reactor.listenTCP(0, api_site(store), interface="127.0.0.1")
    expected: dict[str, bytes] = {}
    spans: dict[str, int] = {}
    try:
        for request in captured:
            body = decode_in_test(request)
            fields = header_fields(request)
            parsed = parse_record(RecordHeader(0, size=0, crc32=0, **fields), body)
            items = parsed.items if parsed is not None else None
            key = await store.append(fields, body, items=items)
            expected[f"{int.from_bytes(key[:8], 'big')}-{int.from_bytes(key[8:], 'big')}"] = body
            for item in items or ():
                if item.kind == "span" and item.trace_id:
                    spans[item.trace_id] = spans.get(item.trace_id, 0) + 1
        assert spans, "the corpus holds traces"
        number = port.getHost().port
        await check_everything(number, expected, spans)

        compactor = Compactor(store, reactor, CompactorOptions(min_age=0, level=19))
        assert await compactor.compact_all() > 0
        assert store.status()["records"] == 0
        await check_everything(number, expected, spans)

        backup(store.env, str(tmp_path / "backup.mdb"), b"correct horse")
    finally:
        await port.stopListening()
        await store.close()

    restored = tmp_path / "restored"
    restore(str(tmp_path / "backup.mdb"), str(restored / "store"), b"correct horse")
    store = RecordStore(StoreOptions(path=str(restored / "store"), durability="none"), reactor)
    store.open()
    port = reactor.listenTCP(0, api_site(store), interface="127.0.0.1")
    try:
        await check_everything(port.getHost().port, expected, spans)
    finally:
        await port.stopListening()
        await store.close()


def test_wrong_passphrase_is_refused(tmp_path: Path):
    import lmdb

    from reductrai.backup import BackupError

    env = lmdb.open(str(tmp_path / "src"), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v" * 3_000_000)
    backup(env, str(tmp_path / "b"), b"one")
    env.close()
    with pytest.raises(BackupError):
        restore(str(tmp_path / "b"), str(tmp_path / "dst"), b"two")
    restore(str(tmp_path / "b"), str(tmp_path / "dst"), b"one")
    env = lmdb.open(str(tmp_path / "dst"), readonly=True)
    with env.begin() as txn:
        assert txn.get(b"k") == b"v" * 3_000_000
