"""
C{reductrai-inspect}: read the store, also while the daemon runs.

The environment is opened read-only; LMDB readers never block the daemon's
writer.  Every command prints a table for people by default and JSON with
C{--json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Iterator, Optional, Sequence

import lmdb

from reductrai.record import KEY_SIZE, RecordCodec, RecordError, RecordHeader, key_from_text, key_to_text, make_key
from reductrai.store import RECORDS_DB, open_environment


def parse_time(text: str) -> int:
    """
    Parse an RFC 3339 time or epoch seconds into nanoseconds.

    @raise argparse.ArgumentTypeError: neither form.
    """
    try:
        return int(float(text) * 1_000_000_000)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}; expected RFC 3339 (2026-12-04T10:00:00Z) or epoch seconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp() * 1_000_000) * 1000


def format_time(time_ns: int) -> str:
    moment = datetime.datetime.fromtimestamp(time_ns / 1e9, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class StoreReader:
    """
    Read-only access to the records of a data directory.
    """

    def __init__(self, data_dir: str) -> None:
        path = os.path.join(data_dir, "store")
        if not os.path.exists(os.path.join(path, "data.mdb")):
            raise SystemExit(f"reductrai-inspect: no store in {data_dir} (expected {path}/data.mdb)")
        self.env = open_environment(path, 0, readonly=True)
        self.records = self.env.open_db(RECORDS_DB, create=False)
        self.codec = RecordCodec()

    def iterate(
        self,
        since: Optional[int] = None,
        until: Optional[int] = None,
        vendor: Optional[str] = None,
        kind: Optional[str] = None,
    ) -> Iterator[tuple[bytes, bytes]]:
        """
        Yield C{(key, value)} in arrival order within the time range, with
        the vendor and kind filters applied.
        """
        with self.env.begin(db=self.records, buffers=False) as txn:
            cursor = txn.cursor()
            positioned = cursor.set_range(make_key(since, 0)) if since else cursor.first()
            if not positioned:
                return
            for key, value in cursor:
                if until is not None and int.from_bytes(key[:8], "big") >= until:
                    return
                if vendor or kind:
                    try:
                        header = self.codec.decode_header(value)
                    except RecordError:
                        continue
                    if vendor and header.vendor != vendor:
                        continue
                    if kind and header.kind != kind:
                        continue
                yield key, value

    def get(self, key: bytes) -> Optional[bytes]:
        with self.env.begin(db=self.records) as txn:
            return txn.get(key)


def _summary(header: RecordHeader, key: bytes, stored: int) -> dict:
    return {
        "key": key_to_text(key),
        "time": format_time(header.received_ns),
        "vendor": header.vendor,
        "kind": header.kind,
        "route": header.route,
        "method": header.method,
        "path": header.path,
        "query": header.query,
        "content_type": header.content_type,
        "content_encoding": header.content_encoding,
        "wire_bytes": header.wire_size,
        "raw_bytes": header.size,
        "stored_bytes": stored,
    }


def command_stat(reader: StoreReader, args) -> int:
    totals = {"records": 0, "raw_bytes": 0, "stored_bytes": 0, "wire_bytes": 0, "corrupt": 0}
    groups: dict[tuple[str, str], dict] = {}
    first = last = None
    for key, value in reader.iterate(args.since, args.until, args.vendor, args.kind):
        try:
            header = reader.codec.decode_header(value)
        except RecordError:
            totals["corrupt"] += 1
            continue
        group = groups.setdefault((header.vendor, header.kind), {"records": 0, "raw_bytes": 0, "stored_bytes": 0})
        for target in (totals, group):
            target["records"] += 1
            target["raw_bytes"] += header.size
            target["stored_bytes"] += len(value)
        totals["wire_bytes"] += header.wire_size
        first = header.received_ns if first is None else first
        last = header.received_ns
    document = dict(totals)
    document["ratio"] = _ratio(totals["raw_bytes"], totals["stored_bytes"])
    document["first"] = format_time(first) if first else None
    document["last"] = format_time(last) if last else None
    document["file_bytes"] = os.path.getsize(os.path.join(reader.env.path(), "data.mdb"))
    document["by_vendor_kind"] = [
        {"vendor": vendor, "kind": kind, **values, "ratio": _ratio(values["raw_bytes"], values["stored_bytes"])}
        for (vendor, kind), values in sorted(groups.items())
    ]
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    print(f"records        {document['records']}")
    print(f"raw bytes      {document['raw_bytes']}")
    print(f"stored bytes   {document['stored_bytes']}  (ratio {document['ratio']})")
    print(f"file bytes     {document['file_bytes']}")
    print(f"time span      {document['first']} .. {document['last']}")
    if totals["corrupt"]:
        print(f"corrupt        {totals['corrupt']}")
    rows = [(r["vendor"], r["kind"], str(r["records"]), str(r["raw_bytes"]), str(r["stored_bytes"]), str(r["ratio"])) for r in document["by_vendor_kind"]]
    if rows:
        print()
        _table(("VENDOR", "KIND", "RECORDS", "RAW", "STORED", "RATIO"), rows)
    return 0


def _ratio(raw: int, stored: int) -> Optional[float]:
    return round(raw / stored, 2) if stored else None


def command_ls(reader: StoreReader, args) -> int:
    entries = []
    for key, value in reader.iterate(args.since, args.until, args.vendor, args.kind):
        try:
            header = reader.codec.decode_header(value)
        except RecordError as error:
            entries.append({"key": key_to_text(key), "error": str(error)})
        else:
            entries.append(_summary(header, key, len(value)))
        if args.limit and len(entries) >= args.limit:
            break
    if args.json:
        for entry in entries:
            print(json.dumps(entry))
        return 0
    rows = [
        (e["key"], e.get("time", "?"), e.get("vendor", "?"), e.get("kind", "?"), e.get("method", ""),
         e.get("path", e.get("error", "")), str(e.get("raw_bytes", "")), str(e.get("stored_bytes", "")))
        for e in entries
    ]
    _table(("KEY", "TIME", "VENDOR", "KIND", "METHOD", "PATH", "RAW", "STORED"), rows)
    return 0


def _body_for_display(header: RecordHeader, body: bytes):
    if header.content_type and "json" in header.content_type or body[:1] in (b"{", b"["):
        try:
            return json.loads(body)
        except ValueError:
            pass
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": __import__("base64").b64encode(body).decode("ascii")}


def command_show(reader: StoreReader, args) -> int:
    try:
        key = key_from_text(args.key)
    except ValueError as error:
        print(f"reductrai-inspect: {error}", file=sys.stderr)
        return 2
    value = reader.get(key)
    if value is None:
        print(f"reductrai-inspect: record {args.key} not found", file=sys.stderr)
        return 1
    try:
        header, body = reader.codec.decode(value)
    except RecordError as error:
        print(f"reductrai-inspect: record {args.key} is corrupt: {error}", file=sys.stderr)
        return 1
    if args.raw:
        sys.stdout.buffer.write(body)
        return 0
    shown = _body_for_display(header, body)
    if args.json:
        print(json.dumps({"record": _summary(header, key, len(value)), "headers": header.headers, "body": shown}, indent=2))
        return 0
    for name, field in _summary(header, key, len(value)).items():
        print(f"{name:18} {field}")
    for name, header_value in header.headers:
        print(f"header             {name}: {header_value}")
    print()
    print(json.dumps(shown, indent=2) if not isinstance(shown, str) else shown)
    return 0


def command_export(reader: StoreReader, args) -> int:
    out = sys.stdout
    count = 0
    for key, value in reader.iterate(args.since, args.until, args.vendor, args.kind):
        try:
            header, body = reader.codec.decode(value)
        except RecordError as error:
            print(f"reductrai-inspect: skipping corrupt record {key_to_text(key)}: {error}", file=sys.stderr)
            continue
        entry = _summary(header, key, len(value))
        entry["headers"] = header.headers
        entry["body"] = _body_for_display(header, body)
        out.write(json.dumps(entry, separators=(",", ":")) + "\n")
        count += 1
        if args.limit and count >= args.limit:
            break
    return 0


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [len(c) for c in columns]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reductrai-inspect", description="Inspect a reductrai store (read-only).")
    parser.add_argument("--data-dir", default=os.environ.get("REDUCTRAI_DATA_DIR", "./var"),
                        help="data directory of the daemon (default: $REDUCTRAI_DATA_DIR or ./var)")
    commands = parser.add_subparsers(dest="command", required=True)

    def filters(sub, with_limit: bool):
        sub.add_argument("--since", type=parse_time, help="first arrival time (RFC 3339 or epoch seconds)")
        sub.add_argument("--until", type=parse_time, help="arrival time to stop before")
        sub.add_argument("--vendor", help="only this vendor (datadog, ...)")
        sub.add_argument("--kind", help="only this kind (metrics, logs, traces, events, ...)")
        if with_limit:
            sub.add_argument("--limit", type=int, default=0, help="at most this many records (0: all)")
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")

    stat = commands.add_parser("stat", help="record counts, raw and stored bytes, by vendor and kind")
    filters(stat, False)
    ls = commands.add_parser("ls", help="list records")
    filters(ls, True)
    show = commands.add_parser("show", help="print one record's metadata and decoded body")
    show.add_argument("key", help="record key as ls prints it (<time_ns>-<sequence>)")
    show.add_argument("--json", action="store_true", help="print JSON for scripts")
    show.add_argument("--raw", action="store_true", help="write the decoded body bytes only")
    export = commands.add_parser("export", help="write records as NDJSON, one object a line")
    filters(export, True)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        reader = StoreReader(args.data_dir)
    except lmdb.Error as error:
        print(f"reductrai-inspect: cannot open the store in {args.data_dir}: {error}", file=sys.stderr)
        return 1
    handlers = {"stat": command_stat, "ls": command_ls, "show": command_show, "export": command_export}
    try:
        return handlers[args.command](reader, args)
    except BrokenPipeError:
        return 0
    finally:
        reader.env.close()


if __name__ == "__main__":
    sys.exit(main())
