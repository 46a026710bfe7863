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
from reductrai.store import RECORDS_DB, StoreView, open_environment


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
    Read-only access to the records of a data directory, hot and packed.
    """

    def __init__(self, data_dir: str) -> None:
        path = os.path.join(data_dir, "store")
        if not os.path.exists(os.path.join(path, "data.mdb")):
            raise SystemExit(f"reductrai-inspect: no store in {data_dir} (expected {path}/data.mdb)")
        self.path = path
        self.env = open_environment(path, 0, readonly=True)
        self.view = StoreView(self.env)
        self.codec = self.view.codec

    def entries(
        self,
        since: Optional[int] = None,
        until: Optional[int] = None,
        vendor: Optional[str] = None,
        kind: Optional[str] = None,
    ):
        """
        Yield L{reductrai.store.Entry} in arrival order within the time
        range, with the vendor and kind filters applied.
        """
        with self.view.begin() as txn:
            yield from self.view.scan(txn, since or 0, until, vendor, kind)

    def decode(self, entry):
        return self.view.decode(entry)

    def get_entry(self, key: bytes):
        with self.view.begin() as txn:
            return self.view.get(txn, key)


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
        "items": header.items,
        "dictionary": header.dictionary,
    }


def command_stat(reader: StoreReader, args) -> int:
    totals = {"records": 0, "raw_bytes": 0, "stored_bytes": 0, "wire_bytes": 0, "corrupt": 0}
    groups: dict[tuple[str, str], dict] = {}
    first = last = None
    for entry in reader.entries(args.since, args.until, args.vendor, args.kind):
        header = entry.header
        if header is None:
            totals["corrupt"] += 1
            continue
        group = groups.setdefault((header.vendor, header.kind), {"records": 0, "raw_bytes": 0, "stored_bytes": 0})
        for target in (totals, group):
            target["records"] += 1
            target["raw_bytes"] += header.size
            target["stored_bytes"] += entry.stored_bytes
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
    for entry in reader.entries(args.since, args.until, args.vendor, args.kind):
        if entry.header is None:
            entries.append({"key": key_to_text(entry.key), "error": entry.error})
        else:
            entries.append(_summary(entry.header, entry.key, entry.stored_bytes))
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
    entry = reader.get_entry(key)
    if entry is None:
        print(f"reductrai-inspect: record {args.key} not found", file=sys.stderr)
        return 1
    value_size = entry.stored_bytes
    try:
        header, body = reader.decode(entry)
    except RecordError as error:
        print(f"reductrai-inspect: record {args.key} is corrupt: {error}", file=sys.stderr)
        return 1
    if args.raw:
        sys.stdout.buffer.write(body)
        return 0
    shown = _body_for_display(header, body)
    if args.json:
        print(json.dumps({"record": _summary(header, key, value_size), "headers": header.headers, "body": shown}, indent=2))
        return 0
    for name, field in _summary(header, key, value_size).items():
        print(f"{name:18} {field}")
    for name, header_value in header.headers:
        print(f"header             {name}: {header_value}")
    print()
    print(json.dumps(shown, indent=2) if not isinstance(shown, str) else shown)
    return 0


def command_export(reader: StoreReader, args) -> int:
    out = sys.stdout
    count = 0
    for record in reader.entries(args.since, args.until, args.vendor, args.kind):
        try:
            header, body = reader.decode(record)
        except RecordError as error:
            print(f"reductrai-inspect: skipping corrupt record {key_to_text(record.key)}: {error}", file=sys.stderr)
            continue
        entry = _summary(header, record.key, record.stored_bytes)
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


class _Progress:
    """
    A progress bar on stderr, redrawn at most every tenth of a second.
    """

    def __init__(self, total: int, label: str, enabled: bool = True) -> None:
        import time

        self.total = max(total, 1)
        self.label = label
        self.done = 0
        self.enabled = enabled and sys.stderr.isatty() or enabled == "always"
        self._time = time.monotonic
        self._last = 0.0

    def step(self, count: int = 1) -> None:
        self.done += count
        now = self._time()
        if self.enabled and now - self._last >= 0.1:
            self._last = now
            self._draw()

    def _draw(self) -> None:
        fraction = min(self.done / self.total, 1.0)
        bar = "#" * int(fraction * 30)
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total}")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            self._draw()
            sys.stderr.write("\n")


def _open_live(args, writable: bool = False):
    path = os.path.join(args.data_dir, "store")
    if not os.path.exists(os.path.join(path, "data.mdb")):
        raise SystemExit(f"reductrai-inspect: no store in {args.data_dir} (expected {path}/data.mdb)")
    if writable:
        return open_environment(path, 0)
    return open_environment(path, 0, readonly=True)


def command_verify(args) -> int:
    """
    Check every hot record's body against its checksum and every block's
    bytes against its checksum and each packed record's; exit 1 when any
    is corrupt.
    """
    from reductrai.store import BLOCKS_DB

    env = _open_live(args)
    view = StoreView(env)
    problems = []
    counts = {"records": 0, "blocks": 0, "packed_records": 0}
    try:
        with view.begin() as txn:
            records = view.handles[RECORDS_DB]
            total = txn.stat(records)["entries"] if records is not None else 0
            blocks = view.handles[BLOCKS_DB]
            total += txn.stat(blocks)["entries"] if blocks is not None else 0
            progress = _Progress(total, "verify", "always" if args.progress else True)
            if records is not None:
                for key, value in txn.cursor(db=records):
                    counts["records"] += 1
                    progress.step()
                    try:
                        view.codec.decode(value)
                    except RecordError as error:
                        problems.append({"key": key_to_text(bytes(key)), "error": str(error)})
            for info in view.all_blocks(txn):
                counts["blocks"] += 1
                progress.step()
                try:
                    rows = view.read_block(txn, info)
                except RecordError as error:
                    problems.append({"block": info.stream + "/" + key_to_text(info.first_key), "error": str(error)})
                    continue
                for entry in view.block_entries(txn, info):
                    counts["packed_records"] += 1
                    try:
                        view.decode(entry)
                    except RecordError as error:
                        problems.append({"key": key_to_text(entry.key), "block": info.stream, "error": str(error)})
                if len(rows) != info.records:
                    problems.append({"block": info.stream + "/" + key_to_text(info.first_key),
                                     "error": f"holds {len(rows)} records, its index says {info.records}"})
            progress.finish()
    finally:
        env.close()
    document = {**counts, "corrupt": len(problems), "problems": problems}
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(f"checked {counts['records']} hot records, {counts['blocks']} blocks ({counts['packed_records']} packed records)")
        for problem in problems:
            where = problem.get("key") or problem.get("block")
            print(f"CORRUPT {where}: {problem['error']}")
        print("ok" if not problems else f"{len(problems)} corrupt")
    return 1 if problems else 0


def command_backup(args) -> int:
    from reductrai.backup import backup

    env = _open_live(args)
    try:
        size = backup(env, args.dest, _passphrase(args))
    finally:
        env.close()
    print(json.dumps({"dest": args.dest, "bytes": size, "encrypted": bool(args.passphrase_file)}))
    return 0


def command_restore(args) -> int:
    from reductrai.backup import restore

    target = os.path.join(args.data_dir, "store")
    if os.path.exists(os.path.join(target, "data.mdb")) and not args.force:
        print(f"reductrai-inspect: {target} already holds a store; stop the daemon and pass --force to replace it",
              file=sys.stderr)
        return 1
    size = restore(args.src, target, _passphrase(args))
    print(json.dumps({"restored": target, "bytes": size}))
    return 0


def _passphrase(args) -> Optional[bytes]:
    if not args.passphrase_file:
        return None
    with open(args.passphrase_file, "rb") as handle:
        return handle.read().strip()


def command_purge(args) -> int:
    """
    Delete every record older than C{--before} now, like retention does.
    """
    import struct

    from reductrai.store import FLOOR_KEY, META_DB

    env = _open_live(args, writable=True)
    try:
        from reductrai.indexes import INDEX_DB, INDEX_REV_DB, reverse_keys
        from reductrai.store import BLOCK_DATA_DB, BLOCKS_DB

        view = StoreView(env)
        end = make_key(args.before, 0)
        deleted = {"records": 0, "blocks": 0, "packed_records": 0}
        with env.begin(write=True) as txn:
            meta = env.open_db(META_DB, txn=txn)
            floor = view.floor(txn)
            if args.before > floor:
                txn.put(FLOOR_KEY, struct.pack(">Q", args.before), db=meta)
            records = view.handles[RECORDS_DB]
            if records is not None:
                cursor = txn.cursor(db=records)
                while cursor.first() and cursor.key() < end:
                    cursor.delete()
                    deleted["records"] += 1
            for info in list(view.all_blocks(txn)):
                if info.last_ns < args.before:
                    txn.delete(info.key, db=view.handles[BLOCKS_DB])
                    txn.delete(info.key, db=view.handles[BLOCK_DATA_DB])
                    deleted["blocks"] += 1
                    deleted["packed_records"] += info.records
            reverse = view.handles[INDEX_REV_DB]
            if reverse is not None:
                cursor = txn.cursor(db=reverse)
                while cursor.first() and cursor.key() < end:
                    for index_key in reverse_keys(cursor.value()):
                        txn.delete(index_key, db=view.handles[INDEX_DB])
                    cursor.delete()
    finally:
        env.close()
    print(json.dumps(deleted))
    return 0


def command_dicts(args) -> int:
    from reductrai.dictionaries import read_dictionaries

    env = _open_live(args)
    try:
        rows = [
            {"id": d.id, "stream": d.stream, "created": format_time(d.created_ns), "samples": d.samples, "bytes": len(d.data)}
            for d in read_dictionaries(env)
        ]
    finally:
        env.close()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _table(("ID", "STREAM", "CREATED", "SAMPLES", "BYTES"),
               [(str(r["id"]), r["stream"], r["created"], str(r["samples"]), str(r["bytes"])) for r in rows])
    return 0


def command_blocks(args) -> int:
    env = _open_live(args)
    try:
        view = StoreView(env)
        with view.begin() as txn:
            rows = [
                {"stream": i.stream, "first": format_time(i.first_ns), "last": format_time(i.last_ns),
                 "first_key": key_to_text(i.first_key), "records": i.records, "items": i.items,
                 "raw_bytes": i.raw_bytes, "stored_bytes": i.stored_bytes, "ratio": _ratio(i.raw_bytes, i.stored_bytes),
                 "level": i.level}
                for i in view.all_blocks(txn)
            ]
    finally:
        env.close()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _table(("STREAM", "FIRST", "LAST", "RECORDS", "RAW", "STORED", "RATIO"),
               [(r["stream"], r["first"], r["last"], str(r["records"]), str(r["raw_bytes"]), str(r["stored_bytes"]),
                 str(r["ratio"])) for r in rows])
    return 0


def command_readers(args) -> int:
    env = _open_live(args)
    try:
        cleared = env.reader_check()
        table = env.readers()
    finally:
        env.close()
    if args.json:
        print(json.dumps({"stale_cleared": cleared, "readers": table}))
    else:
        print(f"stale readers cleared: {cleared}")
        print(table)
    return 0


def command_compact(args) -> int:
    """
    Rewrite the data file without its free pages (run with the daemon
    stopped): the copy replaces the original.
    """
    import shutil
    import tempfile

    path = os.path.join(args.data_dir, "store")
    env = _open_live(args)
    before = os.path.getsize(os.path.join(path, "data.mdb"))
    scratch = tempfile.mkdtemp(prefix="compact-", dir=args.data_dir)
    try:
        env.copy(scratch, compact=True)
    finally:
        env.close()
    os.replace(os.path.join(scratch, "data.mdb"), os.path.join(path, "data.mdb"))
    shutil.rmtree(scratch, ignore_errors=True)
    after = os.path.getsize(os.path.join(path, "data.mdb"))
    print(json.dumps({"before_bytes": before, "after_bytes": after}))
    return 0


def _register_maintenance(commands) -> None:
    verify = commands.add_parser("verify", help="check every record's and block's checksum")
    verify.add_argument("--json", action="store_true", help="print JSON for scripts")
    verify.add_argument("--progress", action="store_true", help="draw the progress bar even when stderr is not a terminal")
    verify.set_defaults(handler=command_verify)
    backup = commands.add_parser("backup", help="write a consistent, compacted copy while the daemon runs")
    backup.add_argument("dest", help="file to write")
    backup.add_argument("--passphrase-file", help="encrypt with AES-GCM under a key derived from this file's passphrase")
    backup.set_defaults(handler=command_backup)
    restore = commands.add_parser("restore", help="replace the store with a backup (daemon stopped)")
    restore.add_argument("src", help="backup file")
    restore.add_argument("--passphrase-file", help="passphrase of an encrypted backup")
    restore.add_argument("--force", action="store_true", help="replace an existing store")
    restore.set_defaults(handler=command_restore)
    purge = commands.add_parser("purge", help="delete every record that arrived before a time")
    purge.add_argument("--before", type=parse_time, required=True, help="RFC 3339 or epoch seconds")
    purge.set_defaults(handler=command_purge)
    for name, handler, text in (("dicts", command_dicts, "list the trained dictionaries"),
                                ("blocks", command_blocks, "list the packed blocks"),
                                ("readers", command_readers, "clear stale readers and list the reader table")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        sub.set_defaults(handler=handler)
    compact = commands.add_parser("compact", help="shrink the data file (daemon stopped)")
    compact.set_defaults(handler=command_compact)


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
    _register_maintenance(commands)
    try:
        from reductrai import inspect_spool
    except ImportError:
        inspect_spool = None
    if inspect_spool is not None:
        inspect_spool.register(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "spool" and getattr(args, "spool_handler", None) is not None:
        return args.spool_handler(args.data_dir, args)
    handler = getattr(args, "handler", None) or getattr(args, "func", None)
    if handler is None and args.command == "spool":
        from reductrai import inspect_spool

        handler = getattr(inspect_spool, "handle", None) or getattr(inspect_spool, "main")
    if handler is not None:
        # Commands registered by other modules (maintenance, spool) open
        # the environment themselves, some of them writable.
        try:
            return handler(args)
        except BrokenPipeError:
            return 0
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
