"""
Hot record values, format version 2: the header shares the zstd frame of
the body and the stream's dictionary, and version 1 values stay readable.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import pytest_twisted
import zstandard
from twisted.internet import defer, reactor, threads
from twisted.internet.testing import MemoryReactorClock

from reductrai.dictionaries import DictionaryManager, DictionaryOptions, dictionary_compressor
from reductrai.record import (
    HEADER_READ_WHOLE_BYTES,
    RecordCodec,
    RecordError,
    RecordHeader,
    header_bytes,
    record_sample,
)
from reductrai.store import RECORDS_DB, RecordStore, StoreOptions

FIELDS = dict(
    vendor="datadog", kind="logs", route="logs_v2", method="POST", path="/api/v2/logs", query="",
    content_type="application/json", content_encoding=None, wire_size=0,
    headers=[["user-agent", "datadog-api-client-python/2.0"]],
)


def leb128(value: int) -> bytes:
    """
    Unsigned LEB128, written here apart from the code under test.
    """
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def expected_head(header: RecordHeader) -> bytes:
    """
    The header JSON as the format describes it: compact, fields in
    declaration order, the optional dictionary and item fields left out
    when unset.
    """
    optional = ("dictionary", "items", "item_min_ns", "item_max_ns")
    fields = {k: v for k, v in header.to_json().items() if not (k in optional and v is None)}
    return json.dumps(fields, separators=(",", ":")).encode()


def log_body(n: int) -> bytes:
    return json.dumps(
        [{"message": f"GET /checkout/{n} 200 {n * 7 % 1000} ms", "service": "checkout", "hostname": f"web-{n % 4}",
          "ddtags": "env:prod,team:payments", "timestamp": 1796000000000 + n * 37}],
        separators=(",", ":"),
    ).encode()


def header_of(body: bytes, n: int = 0, dictionary=None) -> RecordHeader:
    return RecordHeader(received_ns=1796000000000000000 + n * 10**6, size=len(body), crc32=zlib.crc32(body),
                        dictionary=dictionary, **FIELDS)


def trained_dictionary(count: int = 300, size: int = 4096) -> bytes:
    """
    A dictionary trained on record samples built by hand: header length,
    header JSON, body.
    """
    samples = []
    for n in range(count):
        body = log_body(n)
        head = expected_head(header_of(body, n, dictionary=1))
        samples.append(leb128(len(head)) + head + body)
    return zstandard.train_dictionary(size, samples).as_bytes()


def test_value_layout_without_dictionary():
    """
    A value is version 2, dictionary 0, then one zstd frame holding the
    header length, the header JSON and the body.
    """
    body = log_body(1)
    header = header_of(body)
    value = RecordCodec().encode(header, body)
    assert value[:2] == b"\x02\x00"
    content = zstandard.ZstdDecompressor().decompress(value[2:])
    head = expected_head(header)
    assert content == leb128(len(head)) + head + body
    assert zstandard.get_frame_parameters(value[2:]).has_checksum
    codec = RecordCodec()
    assert codec.decode_header(value) == header
    assert codec.decode(value) == (header, body)


def test_dictionary_id_precedes_frame():
    """
    The dictionary id, plus 1, precedes the frame; the frame decompresses
    with that dictionary and the header inside names the same one.
    """
    data = trained_dictionary()
    body = log_body(1000)
    for dictionary_id in (1, 200):
        header = header_of(body, dictionary=dictionary_id)
        value = RecordCodec().encode(header, body, dictionary_compressor(data, 3))
        assert value[:1] == b"\x02"
        assert value[1:].startswith(leb128(dictionary_id + 1))
        frame = value[1 + len(leb128(dictionary_id + 1)):]
        content = zstandard.ZstdDecompressor(dict_data=zstandard.ZstdCompressionDict(data)).decompress(frame)
        assert content.endswith(body)
        codec = RecordCodec(dictionary_lookup={dictionary_id: data}.get)
        assert codec.decode(value) == (header, body)
        with pytest.raises(RecordError, match="dictionary"):
            RecordCodec(dictionary_lookup={}.get).decode_header(value)


def test_dictionary_makes_the_header_cheap():
    """
    With a dictionary trained on samples that include headers, a small
    record's whole value is smaller than its header JSON alone and than
    its raw body.  A dictionary trained on bodies alone does worse.
    """
    with_headers = trained_dictionary()
    bodies_only = zstandard.train_dictionary(4096, [log_body(n) for n in range(300)]).as_bytes()
    body = log_body(1001)
    header = header_of(body, 1001, dictionary=1)
    value = RecordCodec().encode(header, body, dictionary_compressor(with_headers, 3))
    plain = RecordCodec().encode(header, body, dictionary_compressor(bodies_only, 3))
    assert len(value) < len(header_bytes(header))
    assert len(value) < len(body)
    assert len(value) < len(plain)


def test_version_1_values_are_read():
    """
    A version 1 value, built here byte by byte as older stores hold it,
    decodes with and without a dictionary; so does one from encode_v1.
    """
    data = trained_dictionary()
    body = log_body(5)
    for dictionary, compressor in ((None, zstandard.ZstdCompressor(write_checksum=True, write_content_size=True)),
                                   (3, zstandard.ZstdCompressor(dict_data=zstandard.ZstdCompressionDict(data),
                                                                write_checksum=True, write_content_size=True,
                                                                write_dict_id=True))):
        header = header_of(body, dictionary=dictionary)
        head = expected_head(header)
        value = struct.pack(">BI", 1, len(head)) + head + compressor.compress(body)
        codec = RecordCodec(dictionary_lookup={3: data}.get)
        assert codec.decode_header(value) == header
        assert codec.decode(value) == (header, body)
        assert RecordCodec(dictionary_lookup={3: data}.get).decode(
            RecordCodec().encode_v1(header, body, compressor)) == (header, body)
        flipped = bytearray(value)
        flipped[-5] ^= 0x40
        with pytest.raises(RecordError):
            codec.decode(bytes(flipped))


def test_header_read_detects_corruption():
    """
    A flipped byte anywhere in the frame fails the header read (the frame
    checksum covers the header now), and so do truncation, an unknown
    version and a dictionary that does not match the header's.
    """
    body = log_body(9) * 3
    header = header_of(body)
    value = RecordCodec().encode(header, body)
    for position in range(len(value)):
        flipped = bytearray(value)
        flipped[position] ^= 0xFF
        codec = RecordCodec()
        with pytest.raises(RecordError):
            codec.decode_header(bytes(flipped))
        with pytest.raises(RecordError):
            codec.decode(bytes(flipped))
    for cut in (0, 1, 2, len(value) // 2, len(value) - 1):
        with pytest.raises(RecordError):
            RecordCodec().decode_header(value[:cut])
    with pytest.raises(RecordError, match="version"):
        RecordCodec().decode(b"\x07" + value[1:])
    # A header that names a dictionary the prefix does not.
    lying = RecordCodec().encode_head(header_bytes(header_of(body, dictionary=4)), None, body)
    with pytest.raises(RecordError, match="dictionary"):
        RecordCodec().decode_header(lying)


def test_body_mismatch_is_reported():
    """
    A frame that decompresses but whose body does not match the header's
    size and CRC-32 fails decode, not decode_header.
    """
    body = log_body(3)
    header = RecordHeader(**{**header_of(body).to_json(), "crc32": zlib.crc32(body) ^ 1})
    value = RecordCodec().encode(header, body)
    codec = RecordCodec()
    assert codec.decode_header(value) == header
    with pytest.raises(RecordError, match="checksum"):
        codec.decode(value)


def test_decode_reuses_header_read():
    """
    Decoding the value whose header was just read returns the same body as
    a fresh codec; another value, even equal bytes, is decompressed anew.
    """
    bodies = [log_body(n) for n in range(3)]
    values = [RecordCodec().encode(header_of(b, n), b) for n, b in enumerate(bodies)]
    codec = RecordCodec()
    for n, value in enumerate(values):
        header = codec.decode_header(value)
        assert codec.decode(value) == (header, bodies[n])
    codec.decode_header(values[0])
    copy = bytearray(values[0])
    copy[-5] ^= 0x40
    with pytest.raises(RecordError):
        codec.decode(bytes(copy))
    assert codec.decode(bytes(bytearray(values[1]))) == (header_of(bodies[1], 1), bodies[1])


def test_large_frame_partial_header_read():
    """
    A frame larger than HEADER_READ_WHOLE_BYTES gives its header without
    decompressing the whole body: a value whose body end is corrupt still
    yields its header, while decode reports the corruption.
    """
    body = b"".join(log_body(n) for n in range(HEADER_READ_WHOLE_BYTES // 100))
    assert len(body) > HEADER_READ_WHOLE_BYTES
    header = header_of(body)
    value = RecordCodec().encode(header, body)
    codec = RecordCodec()
    assert codec.decode_header(value) == header
    assert codec.decode(value) == (header, body)
    broken = bytearray(value)
    broken[-2] ^= 0xFF
    assert RecordCodec().decode_header(bytes(broken)) == header
    with pytest.raises(RecordError):
        RecordCodec().decode(bytes(broken))


def test_sample_starts_frame_content():
    """
    A training sample is the header length, the header and the body, cut
    at the limit.
    """
    head = b'{"vendor":"datadog"}'
    body = bytes(range(200))
    assert record_sample(head, body, 10_000) == leb128(len(head)) + head + body
    assert record_sample(head, body, 50) == (leb128(len(head)) + head + body)[:50]
    assert record_sample(head, body, 5) == (leb128(len(head)) + head)[:5]


def test_observe_keeps_samples_with_headers():
    """
    DictionaryManager.observe with a header keeps the start of the
    record's frame content, cut at max_sample_size.
    """
    options = DictionaryOptions(first_records=10_000, max_sample_size=100)
    manager = DictionaryManager(options, submit=lambda ops: defer.succeed(None), reactor=MemoryReactorClock())
    body = log_body(1)
    head = header_bytes(header_of(body))
    manager.observe("datadog/logs", body, head)
    manager.observe("datadog/logs", body)
    samples = list(manager._streams["datadog/logs"].samples)
    assert samples == [(leb128(len(head)) + head + body)[:100], body[:100]]


def store_fields() -> dict:
    return dict(FIELDS)


async def wait_for_training(store: RecordStore, count: int = 1) -> None:
    for _ in range(500):
        if store.dictionaries.trainings >= count:
            return
        await threads.deferToThread(lambda: None)
    raise AssertionError("no dictionary was trained")


@pytest_twisted.ensureDeferred
async def test_store_writes_dictionary_version_2(tmp_path: Path):
    """
    The store trains the stream's dictionary on samples that begin with
    the header.  It then writes dictionary-compressed version 2 values
    smaller than their raw bodies, and a scan reads every record back.
    """
    options = StoreOptions(path=str(tmp_path / "store"), durability="none",
                           dictionaries=DictionaryOptions(first_records=100, size=4096))
    store = RecordStore(options, reactor)
    store.open()
    try:
        bodies = {}
        for n in range(100):
            body = log_body(n)
            bodies[await store.append(store_fields(), body)] = body
        await wait_for_training(store)
        first = min(bodies)
        with store.view().begin() as txn:
            first_header = store.view().codec.decode_header(txn.get(first, db=store.database(RECORDS_DB)))
        head = expected_head(first_header)
        assert store.dictionaries._streams["datadog/logs"].samples[0] == leb128(len(head)) + head + bodies[first]
        later = []
        for n in range(100, 130):
            body = log_body(n)
            key = await store.append(store_fields(), body)
            bodies[key] = body
            later.append(key)
        view = store.view()
        with view.begin() as txn:
            values = {key: txn.get(key, db=view.handles[RECORDS_DB]) for key in later}
            entries = list(view.scan(txn, 0, None, None, None, None))
            decoded = {entry.key: view.decode(entry)[1] for entry in entries}
        assert decoded == bodies
        for key, value in values.items():
            header = view.codec.decode_header(value)
            assert header.dictionary is not None
            assert value[:1] == b"\x02"
            assert len(value) < len(bodies[key])
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_store_reads_mixed_versions(tmp_path: Path):
    """
    A store that contains version 1 values (an older store) returns them
    and new version 2 values from the same scan.
    """
    store = RecordStore(StoreOptions(path=str(tmp_path / "store"), durability="none", use_dictionaries=False),
                        reactor)
    store.open()
    try:
        old_key = store.next_key()
        old_body = log_body(77)
        header = RecordHeader(received_ns=int.from_bytes(old_key[:8], "big"), size=len(old_body),
                              crc32=zlib.crc32(old_body), **FIELDS)
        await store.submit([("put", RECORDS_DB, old_key, RecordCodec().encode_v1(header, old_body))])
        new_key = await store.append(store_fields(), log_body(78))
        view = store.view()
        with view.begin() as txn:
            entries = list(view.scan(txn, 0, None, None, None, None))
            got = {entry.key: view.decode(entry)[1] for entry in entries}
            raw = txn.get(old_key, db=view.handles[RECORDS_DB])
        assert raw[:1] == b"\x01"
        assert got == {old_key: old_body, new_key: log_body(78)}
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_offloaded_record_sampled_with_header(tmp_path: Path):
    """
    A body large enough to be encoded in a thread is stored as version 2
    and sampled, header first, once encoded.
    """
    options = StoreOptions(path=str(tmp_path / "store"), durability="none", offload_bytes=1000,
                           dictionaries=DictionaryOptions(first_records=10_000, max_sample_size=4096))
    store = RecordStore(options, reactor)
    store.open()
    try:
        body = b"".join(log_body(n) for n in range(40))
        assert len(body) > 1000
        key = await store.append(store_fields(), body)
        with store.view().begin() as txn:
            value = txn.get(key, db=store.view().handles[RECORDS_DB])
        header, decoded = RecordCodec().decode(value)
        assert decoded == body
        samples = list(store.dictionaries._streams["datadog/logs"].samples)
        head = header_bytes(header)
        assert samples == [(leb128(len(head)) + head + body)[:4096]]
    finally:
        await store.close()
