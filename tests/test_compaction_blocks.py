"""
Block layout version 3: columnar record headers with deduplicated header
shapes, a per-block digest or per-record CRC-32 column, and reading of the
version 2 blocks that older stores hold.
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import attrs
import pytest
import pytest_twisted
import zstandard
from twisted.internet import defer, reactor

from reductrai.compactor import Compactor, CompactorOptions, compress_block
from reductrai.formats.items import LOG, Item
from reductrai.itemtimes import derive_item_times
from reductrai.record import (
    BLOCK_DERIVED_ITEM_TIMES,
    BLOCK_SCALED_TIMES,
    RecordError,
    RecordHeader,
    block_v3_sections,
    decode_block,
    encode_block,
    encode_block_v3,
    make_key,
    packed_header_bytes,
    parse_packed_header,
)
from reductrai.store import BLOCK_DATA_DB, BLOCKS_DB, BlockInfo, RecordStore, StoreOptions, block_key


def make_header(time_ns: int, body: bytes, **changes) -> RecordHeader:
    header = RecordHeader(
        received_ns=time_ns, vendor="datadog", kind="logs", route="logs_v2", method="POST",
        path="/api/v2/logs", query="", content_type="application/json", content_encoding="gzip",
        wire_size=len(body) // 2 + 7, size=len(body), crc32=zlib.crc32(body),
        headers=[["user-agent", "test/1"], ["dd-evp-origin", "agent"]],
    )
    return attrs.evolve(header, **changes)


def sample_entries(count: int, seed: int = 7) -> list[tuple[bytes, RecordHeader, bytes]]:
    """
    Records with every kind of field variation: times with random gaps,
    sequences that wrap, three header shapes, items set and unset, item
    times before and after arrival, wire sizes above and below the size.
    """
    rng = random.Random(seed)
    entries = []
    time_ns = 1_700_000_000_000_000_000
    for n in range(count):
        time_ns += rng.randrange(0, 10**9)
        body = json.dumps({"n": n, "message": "line %d" % rng.randrange(10**6)}).encode() * rng.randrange(1, 4)
        changes = {}
        if n % 3 == 1:
            changes.update(route="logs_v1", query="ddsource=x", headers=[["user-agent", "other/2"]], dictionary=5)
        if n % 3 == 2:
            changes.update(content_encoding=None, wire_size=len(body) + rng.randrange(-5, 5), content_type=None)
        if n % 2:
            changes.update(items=rng.randrange(0, 50), item_min_ns=time_ns - rng.randrange(10**12),
                           item_max_ns=time_ns + rng.randrange(-10**9, 10**9))
        sequence = (0xFFFFFFF0 + n) & 0xFFFFFFFF
        entries.append((make_key(time_ns, sequence), make_header(time_ns, body, **changes), body))
    return entries


@pytest.mark.parametrize("record_checksums", [False, True])
def test_v3_round_trip_keeps_every_field(record_checksums: bool) -> None:
    entries = sample_entries(60)
    rows = list(decode_block(encode_block_v3(entries, record_checksums)))
    assert [key for key, _, _ in rows] == [key for key, _, _ in entries]
    assert [body for _, _, body in rows] == [body for _, _, body in entries]
    for (key, head, body), (_, header, _) in zip(rows, entries):
        assert parse_packed_header(head, key, body) == header


def test_identical_headers_are_stored_once() -> None:
    body = b'{"message":"same"}'
    entries = [(make_key(10**18 + n * 1000, n), make_header(10**18 + n * 1000, body), body) for n in range(200)]
    layout = encode_block_v3(entries)
    shape = json.dumps({k: v for k, v in attrs.asdict(entries[0][1]).items()
                        if k in ("vendor", "kind", "route", "method", "path", "query", "content_type",
                                 "content_encoding", "headers", "dictionary")}, separators=(",", ":")).encode()
    assert layout.count(shape) == 1
    bodies_alone = len(zstandard.ZstdCompressor(level=19).compress(body * 200))
    # The header shape once, constant columns and the frame's checksum.
    assert len(compress_block(entries, 19)) - bodies_alone < len(shape) + 100


def test_digest_detects_bodies_that_do_not_match_ingest() -> None:
    entries = sample_entries(10)
    key, header, body = entries[4]
    # A body that differs from what ingest checksummed, with the right size.
    entries[4] = (key, header, bytes([body[0] ^ 1]) + body[1:])
    with pytest.raises(RecordError, match="checksums taken at ingest"):
        list(decode_block(encode_block_v3(entries, record_checksums=False)))


def test_crc_column_finds_changed_record() -> None:
    entries = sample_entries(10)
    key, header, body = entries[4]
    entries[4] = (key, header, bytes([body[0] ^ 1]) + body[1:])
    rows = list(decode_block(encode_block_v3(entries, record_checksums=True)))
    mismatched = [n for n, (key, head, body) in enumerate(rows)
                  if parse_packed_header(head, key, body).crc32 != zlib.crc32(body)]
    assert mismatched == [4]


def test_v3_rejects_unsorted_records_and_wrong_sizes() -> None:
    entries = sample_entries(5)
    with pytest.raises(RecordError):
        encode_block_v3([entries[1], entries[0]])
    key, header, body = entries[0]
    with pytest.raises(RecordError):
        encode_block_v3([(key, header, body + b"x")])


def millisecond_entries(count: int, seed: int = 11) -> list[tuple[bytes, RecordHeader, bytes]]:
    """
    Records as the store now keys them: whole-millisecond arrival times,
    item times in whole seconds (before and after arrival), some unset.
    """
    rng = random.Random(seed)
    entries = []
    time_ns = 1_796_000_000_123_000_000
    for n in range(count):
        time_ns += rng.randrange(10, 1000) * 10**6
        body = b'{"n":%d}' % n
        changes = {}
        if n % 4:
            first = (time_ns // 10**9 + rng.randrange(-100, 3)) * 10**9
            changes.update(items=3, item_min_ns=first, item_max_ns=first + rng.randrange(0, 20) * 10**9)
        entries.append((make_key(time_ns, n + 1), make_header(time_ns, body, **changes), body))
    return entries


def test_scaled_time_columns_round_trip() -> None:
    """
    Whole-millisecond keys and whole-second item times read back exactly,
    and their columns cost at least 2 bytes a record less than the same
    records with nanosecond noise in their arrival times.
    """
    entries = millisecond_entries(400)
    layout = encode_block_v3(entries)
    rows = list(decode_block(layout))
    assert [key for key, _, _ in rows] == [key for key, _, _ in entries]
    for (key, head, body), (_, header, _) in zip(rows, entries):
        assert parse_packed_header(head, key, body) == header

    rng = random.Random(3)
    noisy = []
    for key, header, body in entries:
        time_ns = header.received_ns + rng.randrange(10**6)
        noisy.append((make_key(time_ns, int.from_bytes(key[8:], "big")), attrs.evolve(header, received_ns=time_ns), body))
    compressor = zstandard.ZstdCompressor(level=19)
    scaled = len(compressor.compress(encode_block_v3(entries)))
    unscaled = len(compressor.compress(encode_block_v3(noisy)))
    assert unscaled - scaled >= 2 * len(entries)


def test_unscaled_v3_blocks_stay_readable() -> None:
    """
    Blocks written before the time scales existed have no scale varints
    and no L{BLOCK_SCALED_TIMES} flag.  With odd nanosecond times every
    scale is 1, so such a block is the new layout less the flag and the
    three varints.
    """
    entries = sample_entries(30)
    sections = block_v3_sections(entries)
    head = bytearray(sections[0])
    assert head[4] & BLOCK_SCALED_TIMES
    assert head[-3:] == b"\x01\x01\x01"
    head[4] &= ~BLOCK_SCALED_TIMES
    old_layout = bytes(head[:-3]) + b"".join(sections[1:])
    rows = list(decode_block(old_layout))
    for (key, head_bytes, body), (entry_key, header, entry_body) in zip(rows, entries):
        assert (key, body) == (entry_key, entry_body)
        assert parse_packed_header(head_bytes, key, body) == header


def test_block_equal_times_and_unknown_flags() -> None:
    """
    Records that all arrive in one millisecond (every delta but the first
    is 0) read back.  A block with a flag this version does not know is
    rejected.
    """
    body = b"{}"
    entries = [(make_key(10**18, n), make_header(10**18, body), body) for n in range(5)]
    assert [key for key, _, _ in decode_block(encode_block_v3(entries))] == [key for key, _, _ in entries]
    layout = bytearray(encode_block_v3(entries))
    layout[4] |= 0x80
    with pytest.raises(RecordError, match="unknown flags"):
        list(decode_block(bytes(layout)))


def test_truncated_v3_block_is_an_error() -> None:
    layout = encode_block_v3(sample_entries(20))
    for cut in (3, 12, len(layout) // 3, len(layout) - 1):
        with pytest.raises(RecordError):
            list(decode_block(layout[:cut]))


def fields(kind: str, n: int) -> dict:
    return {"vendor": "datadog", "kind": kind, "route": "r", "method": "POST", "path": "/p", "query": "",
            "content_type": "application/json", "content_encoding": "gzip" if n % 2 else None,
            "wire_size": 10 + n, "headers": [["user-agent", "t"]]}


@pytest_twisted.ensureDeferred
async def test_compacted_records_read_back_identical(tmp_path: Path) -> None:
    store = RecordStore(StoreOptions(path=str(tmp_path / "store"), durability="none"), reactor)
    store.open()
    try:
        keys = []
        for n in range(50):
            body = json.dumps({"n": n, "text": "x" * (n % 7)}).encode()
            keys.append(await store.append(fields("metrics" if n % 4 else "logs", n), body))
        view = store.view()
        with view.begin() as txn:
            before = {key: view.decode(view.get(txn, key)) for key in keys}
        written = await Compactor(store, reactor, CompactorOptions(min_age=0)).compact_all()
        assert written == 2
        view = store.view()
        with view.begin() as txn:
            assert store.status()["blocks"] == 2
            for key in keys:
                entry = view.get(txn, key)
                assert entry.block is not None
                assert view.decode(entry) == before[key]
            scanned = [entry.key for entry in view.scan(txn)]
        assert scanned == sorted(keys)
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_version_2_blocks_stay_readable(tmp_path: Path) -> None:
    store = RecordStore(StoreOptions(path=str(tmp_path / "store"), durability="none"), reactor)
    store.open()
    try:
        entries = sample_entries(12)
        old = [(key, packed_header_bytes(header), body) for key, header, body in entries]
        data = zstandard.ZstdCompressor(level=19, write_checksum=True).compress(encode_block(old))
        raw = sum(len(head) + len(body) for _, head, body in old)
        first, last = entries[0][0], entries[-1][0]
        info = BlockInfo(
            key=block_key("datadog/logs", first), stream="datadog/logs", first_key=first, last_key=last,
            first_ns=entries[0][1].received_ns, last_ns=entries[-1][1].received_ns, records=len(entries),
            items=0, item_min_ns=None, item_max_ns=None, raw_bytes=raw, stored_bytes=len(data), level=19,
            crc32=zlib.crc32(data), created_ns=0,
        )
        await store.submit([("put", BLOCKS_DB, info.key, info.to_value()), ("put", BLOCK_DATA_DB, info.key, data)])
        view = store.view()
        with view.begin() as txn:
            for key, header, body in entries:
                assert view.decode(view.get(txn, key)) == (header, body)
    finally:
        store.close()


def test_compress_block_frame_checks_content() -> None:
    entries = sample_entries(30)
    frame = bytearray(compress_block(entries, 3))
    frame[len(frame) // 2] ^= 0xFF
    with pytest.raises(zstandard.ZstdError):
        zstandard.ZstdDecompressor().decompress(bytes(frame))


@pytest.mark.parametrize("item_times", [(None, None), (1_795_999_000 * 10**9, None), (-5, 1_796_000_100 * 10**9)])
def test_block_index_entry_round_trip(item_times) -> None:
    """
    A block index entry reads back equal from its binary value, which is
    a fraction of the JSON that earlier versions wrote.  That JSON still
    reads back too.
    """
    first_key, last_key = make_key(1_796_000_000 * 10**9, 7), make_key(1_796_003_600 * 10**9, 99)
    info = BlockInfo(
        key=block_key("loki/logs", first_key), stream="loki/logs", first_key=first_key, last_key=last_key,
        first_ns=1_796_000_000 * 10**9, last_ns=1_796_003_600 * 10**9, records=93, items=12_345_678_901,
        item_min_ns=item_times[0], item_max_ns=item_times[1], raw_bytes=4 << 20, stored_bytes=123_456,
        level=-5, crc32=0xFFFFFFFF, created_ns=1_796_004_000 * 10**9,
    )
    value = info.to_value()
    assert BlockInfo.from_value(info.key, value) == info
    document = attrs.asdict(info)
    del document["key"]
    document.update(first_key=first_key.hex(), last_key=last_key.hex())
    earlier = json.dumps(document, separators=(",", ":")).encode()
    assert BlockInfo.from_value(info.key, earlier) == info
    assert len(value) * 4 < len(earlier)
    with pytest.raises(RecordError):
        BlockInfo.from_value(info.key, value[:-1])


@pytest_twisted.ensureDeferred
async def test_buffer_budget_seals_largest_stream(tmp_path: Path) -> None:
    """
    Caught up, the compactor keeps filling each stream's buffer.  Once the
    buffers together pass C{buffer_max_bytes}, it seals the largest one and
    keeps the others for more records.
    """
    store = RecordStore(StoreOptions(path=str(tmp_path / "store"), durability="none"), reactor)
    store.open()
    try:
        sizes = {"logs": 3000, "metrics": 1000, "events": 500}
        for kind, size in sizes.items():
            for n in range(4):
                await store.append(fields(kind, n), json.dumps({"n": n, "pad": "y" * size}).encode())
        options = CompactorOptions(min_age=0, buffer_max_bytes=12_000, slice_seconds=30.0)
        compactor = Compactor(store, reactor, options, run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a))
        assert compactor.run_slice(min_age=0) is True
        raw = {buffer.stream: buffer.raw_bytes for buffer in compactor._buffers.values()}
        assert sum(raw.values()) > options.buffer_max_bytes
        info = await compactor._seal_due(force=False, caught_up=True)
        assert info.stream == "datadog/logs"
        assert info.records == 4
        assert set(buffer.stream for buffer in compactor._buffers.values()) == {"datadog/metrics", "datadog/events"}
        assert sum(buffer.raw_bytes for buffer in compactor._buffers.values()) <= options.buffer_max_bytes
        assert compactor._seal_due(force=False, caught_up=True) is None
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_compactor_omits_derivable_item_times(tmp_path: Path) -> None:
    """
    Records whose item time ranges the parsers reproduce from the body
    are packed without them, flagged so, and read back with the same
    ranges.  A block with one record whose stored range differs keeps the
    columns.
    """
    store = RecordStore(StoreOptions(path=str(tmp_path / "store"), durability="none"), reactor)
    store.open()
    try:
        logs = {"vendor": "datadog", "kind": "logs", "route": "logs_v2", "method": "POST", "path": "/api/v2/logs",
                "query": "", "content_type": "application/json", "content_encoding": None, "wire_size": 1,
                "headers": [["user-agent", "t"]]}
        bodies = [json.dumps([{"message": f"m{n}", "timestamp": 1_796_000_000_123 + n * 7}]).encode() for n in range(6)]
        keys = []
        for body in bodies:
            items = [Item(kind=LOG, index=0, timestamp_ns=json.loads(body)[0]["timestamp"] * 10**6, message="m")]
            keys.append(await store.append(logs, body, items=items))
        await Compactor(store, reactor, CompactorOptions(min_age=0)).compact_all()
        view = store.view()
        with view.begin() as txn:
            headers = [view.decode(view.get(txn, key))[0] for key in keys]
            block = next(iter(txn.cursor(db=view.handles[BLOCK_DATA_DB])))[1]
        layout = zstandard.ZstdDecompressor().decompress(block)
        assert layout[4] & BLOCK_DERIVED_ITEM_TIMES
        assert [h.item_min_ns for h in headers] == [(1_796_000_000_123 + n * 7) * 10**6 for n in range(6)]
        assert [h.item_max_ns for h in headers] == [h.item_min_ns for h in headers]
        view = store.view()
        view.item_times = False
        with view.begin() as txn:
            lean = [view.decode(view.get(txn, key))[0] for key in keys]
        assert [(h.items, h.item_min_ns, h.item_max_ns) for h in lean] == [(1, None, None)] * 6

        entries = [(key, header, body) for key, header, body in zip(keys, headers, bodies)]
        entries[2] = (keys[2], attrs.evolve(headers[2], item_min_ns=headers[2].item_min_ns - 1), bodies[2])
        sections = block_v3_sections(entries, derive=derive_item_times)
        assert not sections[0][4] & BLOCK_DERIVED_ITEM_TIMES
        rows = list(decode_block(b"".join(sections)))
        assert parse_packed_header(rows[2][1], rows[2][0], rows[2][2]).item_min_ns == headers[2].item_min_ns - 1
    finally:
        await store.close()
