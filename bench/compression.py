"""
Compression benchmark: stored bytes against raw bytes, per dataset.

Run: /work/venv/bin/python bench/compression.py [--replays N] > bench/compression_results.md

Datasets: each corpus folder replayed N times (default 40), and each loghub
file wrapped as Datadog logs JSON batches (50 lines a request).  Replays
vary timestamps, values and ids so that no request repeats byte for byte:
JSON bodies get every number of 10-19 digits shifted by the replay's time
offset (timestamps), every other number replaced by a random one of the
same length (values), and every 16- or 32-digit hex string replaced by
random hex (ids); protobuf bodies (OTLP, Prometheus) are decoded, their
time fields shifted, doubles scaled by a random factor and trace and span
ids replaced, and encoded again.  Loghub lines are real and distinct and
are not replayed.

Columns, all "raw / stored" over decoded bodies:
  gzip-6 and zstd-3 per request, reductrai hot (keys and record values as
  the store writes them: header and body in one zstd frame with the
  stream's trained dictionary, trained as the store trains; plus the
  dictionaries),
  reductrai packed (blocks at zstd 19 through the compactor's code,
  including headers and block index entries), whole-stream zstd -19 of the
  concatenated bodies (the reference).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import sys
import zlib
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs

import attrs
import zstandard
from twisted.internet import defer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reductrai.compactor import CompactorOptions, compress_block  # noqa: E402
from reductrai.dictionaries import DICTS_DB, DictionaryManager, DictionaryOptions  # noqa: E402
from reductrai.encoding import decode_body  # noqa: E402
from reductrai.formats.items import PayloadContext  # noqa: E402
from reductrai.indexes import summary_of  # noqa: E402
from reductrai.itemtimes import derive_item_times  # noqa: E402
from reductrai.record import (  # noqa: E402
    KEY_SIZE, KEY_TIME_UNIT_NS, RecordCodec, RecordHeader, header_bytes, make_key,
)
from reductrai.store import BlockInfo, block_key  # noqa: E402
from reductrai.vendors.registry import default_router  # noqa: E402
from tests import corpus  # noqa: E402

LOGHUB = Path(__file__).resolve().parent.parent.parent / "shared" / "loghub"
_NUMBER = re.compile(rb"(?<![0-9A-Za-z_.])[0-9]+(?![0-9A-Za-z_])")
_HEX = re.compile(rb"\b[0-9a-f]{32}\b|\b[0-9a-f]{16}\b")


def vary_json(body: bytes, replay: int, rng: random.Random) -> bytes:
    def number(match):
        text = match.group(0)
        if 10 <= len(text) <= 19:
            scale = 10 ** (len(text) - 10)
            return str(int(text) + replay * 10 * scale).encode()
        if len(text) <= 1:
            return text
        return str(rng.randrange(10 ** (len(text) - 1), 10 ** len(text))).encode()

    body = _HEX.sub(lambda m: "".join(rng.choice("0123456789abcdef") for _ in m.group(0)).encode(), body)
    return _NUMBER.sub(number, body)


def vary_message(message, replay: int, rng: random.Random) -> None:
    from google.protobuf.descriptor import FieldDescriptor as F

    for field, value in message.ListFields():
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == F.LABEL_REPEATED
        if field.type == F.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                continue
            for child in (value if repeated else [value]):
                vary_message(child, replay, rng)
        elif field.type == F.TYPE_DOUBLE and not repeated:
            setattr(message, field.name, value * rng.uniform(0.5, 1.5))
        elif field.type in (F.TYPE_FIXED64, F.TYPE_INT64, F.TYPE_UINT64) and "time" in field.name.lower() and not repeated:
            setattr(message, field.name, value + replay * 10_000_000_000 + rng.randrange(1000))
        elif field.type == F.TYPE_BYTES and field.name in ("trace_id", "span_id", "parent_span_id") and not repeated:
            setattr(message, field.name, rng.randbytes(len(value)) if value else value)


def vary_protobuf(folder: str, path: str, body: bytes, replay: int, rng: random.Random) -> bytes:
    if folder.startswith("prometheus"):
        from reductrai.proto import prometheus_remote_pb2

        message = prometheus_remote_pb2.WriteRequest()
        message.ParseFromString(body)
        for series in message.timeseries:
            for sample in series.samples:
                sample.value *= rng.uniform(0.5, 1.5)
                sample.timestamp += replay * 10_000
        return message.SerializeToString()
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    cls = {"traces": trace_service_pb2.ExportTraceServiceRequest, "metrics": metrics_service_pb2.ExportMetricsServiceRequest,
           "logs": logs_service_pb2.ExportLogsServiceRequest}[path.rstrip("/").rsplit("/", 1)[-1]]
    message = cls()
    message.ParseFromString(body)
    vary_message(message, replay, rng)
    return message.SerializeToString()


_ROUTER = default_router()


def describe(path: str, content_type: Optional[str], body: bytes, query: str = "",
             headers: Optional[dict] = None) -> dict:
    """
    Return the header fields the daemon derives from a request.  Vendor,
    kind and route come from the route table.  The item count and time
    range come from the route's own parser, and are left out when it has
    no parser or the body does not parse.
    """
    match = _ROUTER.match(path, content_type)
    fields = {"vendor": match.vendor.name, "kind": match.route.kind, "route": match.route.name}
    if match.route.parser is not None:
        context = PayloadContext(path=path, content_type=content_type, query=parse_qs(query), headers=headers or {})
        try:
            fields.update(summary_of(match.route.parser(body, context).items))
        except Exception:
            pass
    return fields


def header_for(path: str, content_type, body: bytes, time_ns: int, content_encoding=None, query: str = "",
               headers: Optional[dict] = None) -> RecordHeader:
    # A body that arrived compressed is counted with the size gzip -6 gives
    # its varied form, so that the wire size varies as it would.
    wire_size = len(gzip.compress(body, 6)) if content_encoding else len(body)
    return RecordHeader(
        received_ns=time_ns // KEY_TIME_UNIT_NS * KEY_TIME_UNIT_NS, method="POST", path=path, query=query,
        content_type=content_type, content_encoding=content_encoding, wire_size=wire_size, size=len(body),
        crc32=zlib.crc32(body), headers=[["user-agent", "bench/1.0"]],
        **describe(path, content_type, body, query, headers),
    )


def corpus_dataset(folder: str, seconds: float, max_raw: int) -> list[tuple[RecordHeader, bytes]]:
    """
    Replay a corpus folder, varied, until its arrivals span C{seconds} or
    its decoded bodies reach C{max_raw} bytes.
    """
    rng = random.Random(folder)
    requests = corpus.load(folder)
    records = []
    start = now = 1_796_000_000 * 10**9
    raw = 0
    replay = 0
    while now - start < seconds * 1e9 and raw < max_raw:
        for captured in requests:
            body = decode_body(captured.body, captured.header("content-encoding"), 1 << 27)
            content_type = captured.header("content-type") or ""
            if "protobuf" in content_type:
                body = vary_protobuf(folder, captured.path, body, replay, rng)
            else:
                body = vary_json(body, replay, rng)
            now += rng.randrange(10**7, 10**9)
            headers = {name.lower(): value for name, value in captured.headers}
            header = header_for(captured.path, content_type, body, now, captured.header("content-encoding"),
                                captured.meta.get("query", ""), headers)
            records.append((header, body))
            raw += len(body)
        replay += 1
    return records


def loghub_dataset(path: Path) -> list[tuple[RecordHeader, bytes]]:
    lines = path.read_text(errors="replace").splitlines()
    service = path.stem.split("_")[0].lower()
    records = []
    now = 1_796_000_000 * 10**9
    for start in range(0, len(lines), 50):
        batch = [
            {"message": line, "ddsource": service, "service": service, "hostname": f"{service}-node-{(start // 50) % 4}",
             "ddtags": f"env:prod,team:{service}", "timestamp": now // 10**6 + i}
            for i, line in enumerate(lines[start : start + 50])
        ]
        body = json.dumps(batch, separators=(",", ":")).encode()
        now += 10**9
        records.append((header_for("/api/v2/logs", "application/json", body, now), body))
    return records


def packed_size(records: list[tuple[RecordHeader, bytes]], level: int, record_checksums: bool,
                options: CompactorOptions = CompactorOptions(), derive=derive_item_times) -> tuple[int, int]:
    """
    Return the stored bytes of the records packed as the compactor packs
    them once it has caught up, and the number of blocks.

    The compactor buffers each stream (vendor and kind) apart and seals a
    buffer once it reaches C{block_max_bytes} raw or spans
    C{block_max_seconds}, or, when all buffers together pass
    C{buffer_max_bytes}, the largest one; what is left at the end of the
    dataset is sealed too.  Each record keeps its real key (arrival
    millisecond and sequence number).  Each block also costs its index
    entry, its key twice and an estimated 60 bytes of LMDB overhead.
    """
    packed = 0
    buffers: dict[str, list] = {}
    blocks = []
    for index, (header, body) in enumerate(records):
        buffer = buffers.setdefault(header.stream, [[], 0])
        buffer[0].append((make_key(header.received_ns, index + 1), header, body))
        buffer[1] += len(header_bytes(header)) + len(body)
        span = header.received_ns - buffer[0][0][1].received_ns
        if buffer[1] >= options.block_max_bytes or span >= options.block_max_seconds * 1e9:
            blocks.append(buffer)
            del buffers[header.stream]
        elif sum(raw for _, raw in buffers.values()) > options.buffer_max_bytes:
            stream = max(buffers, key=lambda name: buffers[name][1])
            blocks.append(buffers.pop(stream))
    blocks.extend(buffers.values())
    for entries, raw in blocks:
        data = compress_block(entries, level, record_checksums, derive)
        key = block_key(entries[0][1].stream, entries[0][0])
        info = BlockInfo(key, entries[0][1].stream, entries[0][0], entries[-1][0], entries[0][1].received_ns,
                         entries[-1][1].received_ns, len(entries), 0, None, None, raw, len(data), level,
                         zlib.crc32(data), 0)
        packed += len(data) + len(info.to_value()) + 2 * len(key) + 60
    return packed, len(blocks)


def hot_size(records: list[tuple[RecordHeader, bytes]], options: DictionaryOptions = DictionaryOptions()) -> int:
    """
    Return the bytes the store writes for the records hot: each record's
    key and value, plus the dictionaries it trains.

    The store's own dictionary manager samples and trains.  Training runs
    inline and commits at once, so the record after a training due point
    already uses the new dictionary.  The daemon trains in a thread, so
    there a few more records use the previous one.  Each value is built
    as L{reductrai.store.RecordStore.append} builds it: the header names
    the stream's current dictionary, the value is encoded with that
    dictionary's compressor and the training sample starts with the
    header.  Each dictionary costs its stored value, its 4-byte key and
    an estimated 40 bytes of LMDB overhead.
    """
    written: list = []

    def submit(ops: list):
        written.extend(ops)
        return defer.succeed(None)

    manager = DictionaryManager(options, submit, reactor=None, clock_ns=lambda: 0,
                                run_in_thread=lambda f, *args: defer.maybeDeferred(f, *args))
    codec = RecordCodec(3)
    hot = 0
    for header, body in records:
        dictionary, compressor = manager.compressor_for(header.stream)
        head = header_bytes(attrs.evolve(header, dictionary=dictionary))
        hot += KEY_SIZE + len(codec.encode_head(head, dictionary, body, compressor))
        manager.observe(header.stream, body, head)
    hot += sum(len(key) + len(value) + 40 for _, db, key, value in written if db == DICTS_DB)
    return hot


def measure(records: list[tuple[RecordHeader, bytes]], options: CompactorOptions, level: int = 19) -> dict:
    bodies = [body for _, body in records]
    raw = sum(len(b) for b in bodies)
    gz = sum(len(gzip.compress(b, 6)) for b in bodies)
    z3 = zstandard.ZstdCompressor(level=3)
    zs = sum(len(z3.compress(b)) for b in bodies)
    whole = len(zstandard.ZstdCompressor(level=19).compress(b"".join(bodies)))
    hot = hot_size(records)
    packed, blocks = packed_size(records, level, False, options)
    packed_crc, _ = packed_size(records, level, True, options)
    span = (records[-1][0].received_ns - records[0][0].received_ns) / 1e9
    return {"requests": len(records), "span": span, "blocks": blocks, "raw": raw, "gzip6": gz, "zstd3": zs,
            "hot": hot, "packed": packed, "packed_crc": packed_crc, "whole19": whole}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--seconds", type=float, default=3600.0,
                        help="replay each corpus folder until its arrivals span this (default one hour)")
    parser.add_argument("--max-raw-mib", type=float, default=16.0,
                        help="or until its decoded bodies reach this many MiB (default 16)")
    parser.add_argument("--buffer-max-mib", type=float, default=CompactorOptions().buffer_max_bytes / 2**20,
                        help="the compactor's buffer_max_bytes, in MiB")
    parser.add_argument("--only", help="run only the datasets whose name contains this")
    args = parser.parse_args()
    options = CompactorOptions(buffer_max_bytes=int(args.buffer_max_mib * 2**20))
    max_raw = int(args.max_raw_mib * 1024 * 1024)
    datasets = [(f"corpus/{f}", lambda f=f: corpus_dataset(f, args.seconds, max_raw)) for f in corpus.folders()]
    datasets += [(f"loghub/{p.name} (Datadog logs, 50 lines a request)", lambda p=p: loghub_dataset(p))
                 for p in sorted(LOGHUB.glob("*.log"))]
    print("| dataset | requests | span s | blocks | raw bytes | gzip-6 per request | zstd-3 per request | reductrai hot "
          "| reductrai packed | packed, CRC-32 per record | whole-stream zstd -19 | packed / whole | packed CRC / whole |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, build in datasets:
        if args.only and args.only not in name:
            continue
        m = measure(build(), options)

        def cell(stored):
            return f"{stored} ({m['raw'] / stored:.1f}x)"

        share = m["whole19"] / m["packed"]
        share_crc = m["whole19"] / m["packed_crc"]
        print(f"| {name} | {m['requests']} | {m['span']:.0f} | {m['blocks']} | {m['raw']} | {cell(m['gzip6'])} | "
              f"{cell(m['zstd3'])} | {cell(m['hot'])} | {cell(m['packed'])} | {cell(m['packed_crc'])} | "
              f"{cell(m['whole19'])} | {share:.0%} | {share_crc:.0%} |", flush=True)


if __name__ == "__main__":
    main()
