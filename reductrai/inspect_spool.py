"""
C{reductrai-inspect spool}: list, replay and drop pending spool entries and
dead letters.

C{list} opens the environment read-only.  C{replay} and C{drop} write:
LMDB lets them run next to the daemon, whose drain loop notices re-queued
entries within its poll interval.  Nothing here shows credentials: pending
entries keep them sealed, dead letters do not keep them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Iterator, Optional

import attrs
import lmdb

from reductrai.spool.entries import (
    BODY_DB,
    DEAD_BODY_DB,
    DEAD_DB,
    SPOOL_DB,
    EntryError,
    decode_entry,
    encode_entry,
    entry_id_from_text,
    entry_id_to_text,
)
from reductrai.store import open_environment

_WHICH = ("pending", "dead", "all")


def register(subparsers) -> None:
    """
    Add the C{spool} command to C{reductrai-inspect}'s subparsers.  The
    parsed arguments carry C{spool_handler}, to be called as
    C{args.spool_handler(args.data_dir, args)}.
    """
    spool = subparsers.add_parser("spool", help="undelivered requests and dead letters")
    actions = spool.add_subparsers(dest="spool_command", required=True)
    listing = actions.add_parser("list", help="list pending entries and dead letters")
    listing.add_argument("--which", choices=_WHICH, default="all", help="pending entries, dead letters or both")
    listing.add_argument("--limit", type=int, default=0, help="at most this many rows (0: all)")
    listing.add_argument("--json", action="store_true", help="print NDJSON for scripts")
    replay = actions.add_parser("replay", help="send dead letters again (move them back to the pending queue)")
    replay.add_argument("ids", nargs="*", help="entry ids as list prints them")
    replay.add_argument("--all", action="store_true", help="every dead letter")
    replay.add_argument("--json", action="store_true", help="print JSON for scripts")
    drop = actions.add_parser("drop", help="delete pending entries or dead letters for good")
    drop.add_argument("ids", nargs="*", help="entry ids as list prints them")
    drop.add_argument("--all-dead", action="store_true", help="every dead letter")
    drop.add_argument("--json", action="store_true", help="print JSON for scripts")
    spool.set_defaults(spool_handler=handle)


def handle(data_dir: str, args) -> int:
    """
    Run a C{spool} command.

    @return: the exit status.
    """
    path = os.path.join(data_dir, "store")
    if not os.path.exists(os.path.join(path, "data.mdb")):
        print(f"reductrai-inspect: no store in {data_dir} (expected {path}/data.mdb)", file=sys.stderr)
        return 1
    command = args.spool_command
    try:
        if command == "list":
            env = open_environment(path, 0, readonly=True)
        else:
            env = lmdb.open(path, max_dbs=64, subdir=True, create=False, readahead=False)
    except lmdb.Error as error:
        print(f"reductrai-inspect: cannot open the store in {data_dir}: {error}", file=sys.stderr)
        return 1
    try:
        if command == "list":
            return _list(env, args)
        if command == "replay":
            return _replay(env, args)
        return _drop(env, args)
    except BrokenPipeError:
        return 0
    finally:
        env.close()


def _open(env, name: bytes):
    try:
        return env.open_db(name, create=False)
    except lmdb.NotFoundError:
        return None


def _rows(env, name: bytes, state: str) -> Iterator[dict]:
    db = _open(env, name)
    if db is None:
        return
    now_ns = time.time_ns()
    with env.begin(db=db, buffers=False) as txn:
        for key, value in txn.cursor():
            try:
                meta, sealed = decode_entry(value)
            except EntryError as error:
                yield {"id": entry_id_to_text(key), "state": state, "error": str(error)}
                continue
            row = {"id": entry_id_to_text(key), "state": state, **meta.to_json()}
            row["age"] = round((now_ns - meta.created_ns) / 1e9, 3)
            row["credentials"] = "sealed" if sealed else "none"
            yield row


def _list(env, args) -> int:
    sources = []
    if args.which in ("pending", "all"):
        sources.append((SPOOL_DB, "pending"))
    if args.which in ("dead", "all"):
        sources.append((DEAD_DB, "dead"))
    shown = 0
    table = []
    for name, state in sources:
        for row in _rows(env, name, state):
            if args.limit and shown >= args.limit:
                break
            shown += 1
            if args.json:
                print(json.dumps(row, separators=(",", ":")))
            else:
                table.append(row)
    if not args.json:
        columns = ("id", "state", "upstream", "method", "display", "attempts", "age", "status", "reason")
        lines = [[str(row.get(c, "") if row.get(c) is not None else "") for c in columns] for row in table]
        widths = [max([len(c)] + [len(line[i]) for line in lines]) for i, c in enumerate(columns)]
        print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
        for line in lines:
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
    return 0


def _ids(args) -> Optional[list[bytes]]:
    try:
        return [entry_id_from_text(text) for text in args.ids]
    except ValueError as error:
        print(f"reductrai-inspect: {error}", file=sys.stderr)
        return None


def _replay(env, args) -> int:
    """
    Move dead letters back to the pending queue with their attempts reset
    and their age restarted.  They keep their id, so they are sent before
    newer entries of their upstream.  A dead letter has no credentials:
    the daemon adds its configured ones, if any.
    """
    ids = _ids(args)
    if ids is None:
        return 2
    if not ids and not args.all:
        print("reductrai-inspect: name entry ids or give --all", file=sys.stderr)
        return 2
    dead, dead_body = _open(env, DEAD_DB), _open(env, DEAD_BODY_DB)
    if dead is None:
        ids, args.all = [], False
    spool, body_db = env.open_db(SPOOL_DB), env.open_db(BODY_DB)
    moved, missing = [], []
    now_ns = time.time_ns()
    with env.begin(write=True) as txn:
        if args.all and dead is not None:
            ids = [bytes(key) for key in txn.cursor(db=dead).iternext(keys=True, values=False)]
        for entry_id in ids:
            value = txn.get(entry_id, db=dead) if dead is not None else None
            if value is None:
                missing.append(entry_id_to_text(entry_id))
                continue
            meta, _ = decode_entry(value)
            pending = attrs.evolve(meta, attempts=0, reason=None, status=None, dead_ns=None, created_ns=now_ns)
            txn.put(entry_id, encode_entry(pending), db=spool)
            txn.delete(entry_id, db=dead)
            body = txn.get(entry_id, db=dead_body) if dead_body is not None else None
            if body is not None:
                txn.put(entry_id, body, db=body_db)
                txn.delete(entry_id, db=dead_body)
            moved.append(entry_id_to_text(entry_id))
    _report(args, {"replayed": moved, "not_found": missing})
    return 1 if missing else 0


def _drop(env, args) -> int:
    ids = _ids(args)
    if ids is None:
        return 2
    if not ids and not args.all_dead:
        print("reductrai-inspect: name entry ids or give --all-dead", file=sys.stderr)
        return 2
    handles = {name: _open(env, name) for name in (SPOOL_DB, BODY_DB, DEAD_DB, DEAD_BODY_DB)}
    dropped, missing = [], []
    with env.begin(write=True) as txn:
        if args.all_dead and handles[DEAD_DB] is not None:
            ids = ids + [bytes(key) for key in txn.cursor(db=handles[DEAD_DB]).iternext(keys=True, values=False)]
        for entry_id in ids:
            found = False
            for name, db in handles.items():
                if db is not None and txn.delete(entry_id, db=db) and name in (SPOOL_DB, DEAD_DB):
                    found = True
            (dropped if found else missing).append(entry_id_to_text(entry_id))
    _report(args, {"dropped": dropped, "not_found": missing})
    return 1 if missing else 0


def _report(args, result: dict) -> None:
    if args.json:
        print(json.dumps(result))
        return
    for what, ids in result.items():
        for text in ids:
            print(f"{what.replace('_', ' ')}: {text}")


def main(argv=None) -> int:
    """
    Run the C{spool} command alone (C{python -m reductrai.inspect_spool
    --data-dir DIR spool list}), as C{reductrai-inspect spool} does.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="reductrai-inspect")
    parser.add_argument("--data-dir", default=os.environ.get("REDUCTRAI_DATA_DIR", "./var"),
                        help="data directory of the daemon (default: $REDUCTRAI_DATA_DIR or ./var)")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.spool_handler(args.data_dir, args)


if __name__ == "__main__":
    sys.exit(main())
