"""
The local store: an LMDB environment holding every accepted request.

The environment is opened in L{RecordStore.open}, which the service calls
from C{startService}, never before twistd forks.  Writes are group commits:
every record appended during one reactor turn is written in one write
transaction at the end of that turn, and each caller's L{Deferred} fires
with the record's key once the transaction has committed.
"""

from __future__ import annotations

import os
import time
import zlib
from pathlib import Path
from typing import Callable, Optional

import attrs
import lmdb
from twisted.internet import defer, task, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from reductrai.record import RecordCodec, RecordHeader, make_key

RECORDS_DB = b"records"
META_DB = b"meta"
MAX_DBS = 32


class StoreError(Exception):
    """
    A record could not be committed.
    """


class StoreFull(StoreError):
    """
    The map reached its configured maximum size: nothing more can be
    stored until space is freed.
    """


class StoreClosed(StoreError):
    """
    The store is not open.
    """


@attrs.frozen
class StoreOptions:
    """
    How the environment is opened and synced.

    @ivar durability: C{"fsync"} syncs every commit before its Deferred
        fires; C{"interval"} syncs every C{sync_interval} seconds in a
        thread (a process crash loses nothing, a power loss at most that
        interval); C{"none"} leaves syncing to the operating system.
    """

    path: str
    map_size: int = 1 << 30
    max_map_size: int = 1 << 38
    compression_level: int = 3
    durability: str = "interval"
    sync_interval: float = 1.0


def open_environment(path: str, map_size: int, readonly: bool = False, sync: bool = False) -> lmdb.Environment:
    """
    Open (creating when writable) the environment at C{path} with the named
    databases reductrai uses.  Files are created with mode 0600.
    """
    if readonly:
        return lmdb.open(
            path, readonly=True, lock=True, max_dbs=MAX_DBS, subdir=True, create=False,
        )
    Path(path).mkdir(mode=0o700, parents=True, exist_ok=True)
    return lmdb.open(
        path,
        map_size=map_size,
        max_dbs=MAX_DBS,
        subdir=True,
        mode=0o600,
        sync=sync,
        metasync=sync,
        readahead=False,
        max_readers=256,
    )


class RecordStore:
    """
    Append-only storage of request records with per-turn group commits.
    """

    log = Logger()

    def __init__(self, options: StoreOptions, reactor, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.options = options
        self._reactor = reactor
        self._clock_ns = clock_ns
        self._codec = RecordCodec(options.compression_level)
        self.env: Optional[lmdb.Environment] = None
        self._records = None
        self._pending: list[tuple[bytes, bytes, Deferred]] = []
        self._pending_ops: list[tuple[list, Deferred]] = []
        self._flush_call = None
        self._last_ns = 0
        self._sequence = 0
        self._sync_loop: Optional[task.LoopingCall] = None
        self._sync_in_flight: Optional[Deferred] = None
        self.map_size = options.map_size
        self.commits = 0
        self.records_written = 0

    @property
    def is_open(self) -> bool:
        return self.env is not None

    def open(self) -> None:
        """
        Open the environment and start the periodic sync, if configured.
        """
        durable = self.options.durability == "fsync"
        self.env = open_environment(self.options.path, self.options.map_size, sync=durable)
        info = self.env.info()
        self.map_size = max(info["map_size"], self.options.map_size)
        self._records = self.env.open_db(RECORDS_DB)
        self._databases = {RECORDS_DB: self._records}
        with self.env.begin(write=True) as txn:
            meta = self.env.open_db(META_DB, txn=txn)
            txn.put(b"format", b"1", db=meta, overwrite=False)
        if self.options.durability == "interval":
            self._sync_loop = task.LoopingCall(self._sync_in_thread)
            self._sync_loop.clock = self._reactor
            self._sync_loop.start(self.options.sync_interval, now=False)
        self.log.info(
            "Opened store {path} ({durability} durability, map size {map_size} bytes)",
            path=self.options.path, durability=self.options.durability, map_size=self.map_size,
        )

    def close(self) -> Deferred:
        """
        Commit what is pending, wait for a running sync, sync and close the
        environment.

        @return: a L{Deferred} that fires once the environment is closed.
        """
        if self.env is None:
            return defer.succeed(None)
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush()
        if self._sync_loop is not None and self._sync_loop.running:
            self._sync_loop.stop()
        waiting = self._sync_in_flight or defer.succeed(None)

        def finish(_):
            if self.env is None:
                return
            if self.options.durability != "none":
                self.env.sync(True)
            self.env.close()
            self.env = None
            self.log.info("Closed store {path}", path=self.options.path)

        return waiting.addCallback(finish)

    def next_key(self) -> bytes:
        """
        Return a fresh key: the current time, made strictly increasing.
        """
        now = self._clock_ns()
        if now <= self._last_ns:
            now = self._last_ns + 1
        self._last_ns = now
        self._sequence = (self._sequence + 1) & 0xFFFFFFFF
        return make_key(now, self._sequence)

    def append(self, header_fields: dict, body: bytes, extra: Optional[list] = None) -> "Deferred[bytes]":
        """
        Store one request.  C{header_fields} are the L{RecordHeader} fields
        other than C{received_ns}, C{size} and C{crc32}, which this method
        fills in.

        @param extra: further operations committed in the same transaction
            as the record, as for L{submit}; a value may be a callable,
            called with the record key, to build it.
        @return: a L{Deferred} that fires with the record key once the
            record is committed, or fails with L{StoreError}.
        """
        if self.env is None:
            return defer.fail(StoreClosed("the store is not open"))
        key = self.next_key()
        header = RecordHeader(
            received_ns=int.from_bytes(key[:8], "big"),
            size=len(body),
            crc32=zlib.crc32(body),
            **header_fields,
        )
        value = self._codec.encode(header, body)
        d: Deferred = Deferred()
        self._pending.append((key, value, d))
        if extra:
            ops = [(op, db, k(key) if callable(k) else k, v(key) if callable(v) else v) for op, db, k, v in extra]
            self._pending_ops.append((ops, Deferred()))
        self._schedule()
        return d

    def submit(self, ops: list) -> Deferred:
        """
        Commit arbitrary operations with the next group commit.

        @param ops: C{("put", db_name, key, value)} and
            C{("delete", db_name, key, None)} tuples; C{db_name} is a named
            database of the environment (bytes), created on first use.
        @return: a L{Deferred} firing with L{None} once committed.
        """
        if self.env is None:
            return defer.fail(StoreClosed("the store is not open"))
        d: Deferred = Deferred()
        self._pending_ops.append((list(ops), d))
        self._schedule()
        return d

    def database(self, name: bytes):
        """
        Return the handle of a named database, creating it on first use.
        """
        handle = self._databases.get(name)
        if handle is None:
            handle = self._databases[name] = self.env.open_db(name)
        return handle

    def _schedule(self) -> None:
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        """
        Commit every pending record and operation in one write transaction.
        """
        self._flush_call = None
        batch, self._pending = self._pending, []
        ops, self._pending_ops = self._pending_ops, []
        waiting = [d for _, _, d in batch] + [d for _, d in ops]
        if not waiting:
            return
        if self.env is None:
            for d in waiting:
                d.errback(StoreClosed("the store closed before the record was committed"))
            return
        while True:
            try:
                with self.env.begin(write=True, db=self._records) as txn:
                    for key, value, _ in batch:
                        txn.put(key, value, append=True)
                    for operations, _ in ops:
                        for op, db_name, key, value in operations:
                            db = self.database(db_name)
                            if op == "put":
                                txn.put(key, value, db=db)
                            else:
                                txn.delete(key, db=db)
                break
            except lmdb.MapFullError:
                if not self._grow():
                    error = StoreFull(
                        f"the store reached its maximum map size ({self.options.max_map_size} bytes)"
                    )
                    for d in waiting:
                        d.errback(error)
                    return
            except lmdb.Error as error:
                self.log.error(
                    "Commit of {count} records and {ops} operations failed: {error}",
                    count=len(batch), ops=len(ops), error=str(error),
                )
                failure = StoreError(f"commit failed: {error}")
                for d in waiting:
                    d.errback(failure)
                return
        self.commits += 1
        self.records_written += len(batch)
        for key, _, d in batch:
            d.callback(key)
        for _, d in ops:
            d.callback(None)

    def _grow(self) -> bool:
        """
        Double the map size, up to the configured maximum.

        @return: whether the map grew.
        """
        if self.map_size >= self.options.max_map_size:
            return False
        new_size = min(self.map_size * 2, self.options.max_map_size)
        self.env.set_mapsize(new_size)
        self.log.info(
            "Grew the store map from {old} to {new} bytes", old=self.map_size, new=new_size
        )
        self.map_size = new_size
        return True

    def _sync_in_thread(self) -> Optional[Deferred]:
        if self.env is None or self._sync_in_flight is not None:
            return None
        env = self.env

        def failed(failure):
            self.log.failure("Periodic sync of the store failed", failure)

        def done(result):
            self._sync_in_flight = None

        d = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), env.sync, True)
        d.addErrback(failed).addBoth(done)
        self._sync_in_flight = d
        return None

    def status(self) -> dict:
        """
        Describe the store for C{/health}.
        """
        if self.env is None:
            return {"state": "closed", "path": self.options.path}
        with self.env.begin(db=self._records) as txn:
            entries = txn.stat(self._records)["entries"]
        info = self.env.info()
        stat = self.env.stat()
        used = (info["last_pgno"] + 1) * stat["psize"]
        return {
            "state": "open",
            "path": self.options.path,
            "records": entries,
            "map_size": self.map_size,
            "used_bytes": used,
            "durability": self.options.durability,
        }


def file_size(path: str) -> int:
    """
    Return the size of the environment's data file.
    """
    return os.path.getsize(os.path.join(path, "data.mdb"))
