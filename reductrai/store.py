"""
The local store: an LMDB environment holding every accepted request.

The environment is opened in L{RecordStore.open}, which the service calls
from C{startService}, never before twistd forks.  Writes are group commits:
every record appended during one reactor turn is written in one write
transaction at the end of that turn, and each caller's L{Deferred} fires
with the record's key once the transaction has committed.

New records land hot: one value per record in C{records}, compressed with
the current trained dictionary of their stream (L{reductrai.dictionaries}).
The compactor (L{reductrai.compactor}) later moves older records of one
stream into blocks: C{blocks} holds each block's index entry and
C{block_data} its compressed bytes, both under the key
C{stream | 0x00 | first record key}.  L{StoreView} reads both forms, so a
record stays addressable by its key wherever it lives.  Retention
(L{reductrai.retention}) keeps a floor time in C{meta}: records older than
the floor are gone for every reader, even while their block still waits to
be deleted as a whole.
"""

from __future__ import annotations

import heapq
import json
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict, deque
from pathlib import Path
from typing import Callable, Iterator, Optional

import attrs
import lmdb
import zstandard
from twisted.internet import defer, task, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel

from reductrai.ratelimit import RateLimitedLog

from reductrai.dictionaries import (
    DICTS_DB,
    DictionaryLookup,
    DictionaryManager,
    DictionaryOptions,
    dictionary_compressor,
)
from reductrai.indexes import INDEX_DB, INDEX_REV_DB, index_ops, summary_of
from reductrai.record import (
    KEY_SIZE,
    KEY_TIME_UNIT_NS,
    RecordCodec,
    RecordError,
    RecordHeader,
    decode_block,
    header_bytes,
    make_key,
    parse_header,
    parse_packed_header,
    split_key,
)

#: Bits of a key's 4-byte sequence number that count records of one
#: worker; the bits above them hold the worker id.
SEQUENCE_BITS = 28
SEQUENCE_MASK = (1 << SEQUENCE_BITS) - 1
WORKER_BITS = 32 - SEQUENCE_BITS
MAX_WORKERS = 1 << WORKER_BITS

RECORDS_DB = b"records"
META_DB = b"meta"
BLOCKS_DB = b"blocks"
BLOCK_DATA_DB = b"block_data"
MAX_DBS = 32

#: Meta key of the retention floor: 8-byte big-endian nanoseconds.
FLOOR_KEY = b"retention-floor"

#: The databases this module manages, in the order C{status} reports them.
STORE_DATABASES = (RECORDS_DB, BLOCKS_DB, BLOCK_DATA_DB, DICTS_DB, INDEX_DB, INDEX_REV_DB, META_DB)


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
    @ivar offload_bytes: bodies of at least this many bytes are checksummed
        and compressed in a thread of the reactor's pool, where zlib and
        zstd release the GIL, so the reactor thread serves other requests
        meanwhile.  Smaller ones are encoded inline because a thread hop
        would cost more than it saves.  C{0} encodes everything inline.
    """

    path: str
    map_size: int = 1 << 30
    max_map_size: int = 1 << 38
    compression_level: int = 3
    durability: str = "interval"
    sync_interval: float = 1.0
    dictionaries: DictionaryOptions = DictionaryOptions()
    use_dictionaries: bool = True
    offload_bytes: int = 64 * 1024


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


class _ThreadCodecs(threading.local):
    """
    The record codec and dictionary compressors of one encoding thread,
    because two threads must not use one zstd context at the same time.

    @ivar compressors: dictionary id to compressor, at most
        L{MAX_COMPRESSORS} of them (the oldest is dropped).
    """

    MAX_COMPRESSORS = 16

    def __init__(self, level: int) -> None:
        self.codec = RecordCodec(level)
        self.compressors: "OrderedDict[int, zstandard.ZstdCompressor]" = OrderedDict()


class _Encoding:
    """
    A record whose value is still being encoded, or is encoded and waits
    for the records before it.

    @ivar value: the stored value once encoded, else L{None}.
    @ivar failure: why encoding failed, else L{None}.
    """

    __slots__ = ("key", "value", "ops", "deferred", "failure")

    def __init__(self, key: bytes, ops: list, deferred: Deferred) -> None:
        self.key = key
        self.value: Optional[bytes] = None
        self.ops = ops
        self.deferred = deferred
        self.failure = None


class RecordStore:
    """
    Append-only storage of request records with per-turn group commits.

    Records reach the commit queue in key order.  A large body is encoded
    in a thread (see L{StoreOptions.offload_bytes}); records appended after
    it wait until it is encoded, so each commit contains keys greater than
    every key committed before it, and a record's extra operations commit
    in the same transaction as the record.
    """

    log = Logger()

    def __init__(
        self,
        options: StoreOptions,
        reactor,
        clock_ns: Callable[[], int] = time.time_ns,
        run_in_thread: Optional[Callable[..., Deferred]] = None,
    ) -> None:
        """
        @param run_in_thread: called as C{run_in_thread(f, *args)}, returns
            a L{Deferred} of C{f(*args)} run in another thread; by default
            the reactor's thread pool, or none (everything is encoded
            inline) when the reactor has no thread pool, as with test
            clocks.
        """
        self.options = options
        self._errors = RateLimitedLog(self.log)
        self._reactor = reactor
        self._clock_ns = clock_ns
        self._codec = RecordCodec(options.compression_level, self._dictionary_bytes)
        self.dictionaries = DictionaryManager(options.dictionaries, self.submit, reactor, clock_ns)
        self.env: Optional[lmdb.Environment] = None
        self._records = None
        self._pending: list[tuple[bytes, bytes, Deferred]] = []
        self._pending_ops: list[tuple[list, Deferred]] = []
        self._flush_call = None
        if run_in_thread is None and hasattr(reactor, "getThreadPool"):
            def run_in_thread(f, *args):
                return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
        self._run_in_thread = run_in_thread
        self._thread_codecs = _ThreadCodecs(options.compression_level)
        self._encoding: "deque[_Encoding]" = deque()
        self._encoded_waiters: list[Deferred] = []
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
        # Processes that grew the map one after the other would each see
        # MDB_MAP_RESIZED at their next transaction, readers included. The
        # map is only address space until pages are written, so a shared
        # environment takes the maximum at once.
        size = self.options.max_map_size if self.shared else self.options.map_size
        self.env = open_environment(self.options.path, size, sync=durable)
        info = self.env.info()
        self.map_size = max(info["map_size"], size)
        self._records = self.env.open_db(RECORDS_DB)
        self._databases = {RECORDS_DB: self._records}
        with self.env.begin(write=True) as txn:
            meta = self.env.open_db(META_DB, txn=txn)
            txn.put(b"format", b"1", db=meta, overwrite=False)
        for name in (META_DB, BLOCKS_DB, BLOCK_DATA_DB, INDEX_DB, INDEX_REV_DB):
            self.database(name)
        self.dictionaries.load(self.env)
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
        Wait for the records being encoded in threads, commit what is
        pending, wait for a running sync, sync and close the environment.

        @return: a L{Deferred} that fires once the environment is closed.
        """
        if self.env is None:
            return defer.succeed(None)
        if self._encoding:
            waiter: Deferred = Deferred()
            self._encoded_waiters.append(waiter)
            return waiter.addCallback(lambda _: self.close())
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

    #: The worker process that writes through this store (0 to
    #: C{MAX_WORKERS - 1}); its id is the high bits of every key's sequence
    #: number, so that keys stay unique when several processes write.
    worker: int = 0
    #: Whether other processes write the same environment (C{server.workers}
    #: above 1): keys of another worker may be greater than this one's, so
    #: commits cannot use LMDB's append mode, and the map is opened at its
    #: maximum size so that no process has to grow it under the others.
    shared: bool = False

    def next_key(self) -> bytes:
        """
        Return a fresh key, greater than every key this store returned
        before: the arrival time in whole milliseconds (kept in the key's
        nanosecond field, never going back when the clock does) and the
        next sequence number, whose top L{WORKER_BITS} bits are the
        L{worker} id.

        Millisecond arrival times cost a packed block about 1.3 bytes a
        record where nanoseconds cost about 4 (see BENCHMARKS.md); the
        sequence number orders records that arrive in the same millisecond.
        """
        now = self._clock_ns() // KEY_TIME_UNIT_NS * KEY_TIME_UNIT_NS
        if now < self._last_ns:
            now = self._last_ns
        self._sequence = (self._sequence + 1) & SEQUENCE_MASK
        if self._sequence == 0 and now == self._last_ns:
            # The sequence wrapped within one millisecond: move on by one.
            now += KEY_TIME_UNIT_NS
        self._last_ns = now
        return make_key(now, (self.worker << SEQUENCE_BITS) | self._sequence)

    def _dictionary_bytes(self, dictionary_id: int) -> Optional[bytes]:
        return self.dictionaries.data.get(dictionary_id)

    def append(
        self, header_fields: dict, body: bytes, extra: Optional[list] = None, items: Optional[list] = None
    ) -> "Deferred[bytes]":
        """
        Store one request.  C{header_fields} are the L{RecordHeader} fields
        other than C{received_ns}, C{size}, C{crc32} and the dictionary and
        item fields, which this method fills in.

        @param extra: further operations committed in the same transaction
            as the record, as for L{submit}; a value may be a callable,
            called with the record key, to build it.
        @param items: the parsed items of the request
            (L{reductrai.formats.items.Item}), when the ingest path parsed
            it: their count and time range go into the header and their
            service, host, metric name and trace id into the secondary
            indexes, in the same transaction.
        @return: a L{Deferred} that fires with the record key once the
            record is committed, or fails with L{StoreError}.
        """
        if self.env is None:
            return defer.fail(StoreClosed("the store is not open"))
        key = self.next_key()
        stream = f"{header_fields['vendor']}/{header_fields['kind']}"
        dictionary, compressor = (
            self.dictionaries.compressor_for(stream) if self.options.use_dictionaries else (None, None)
        )
        fields = dict(header_fields)
        if items is not None:
            fields.update(summary_of(items))
        fields["received_ns"] = int.from_bytes(key[:8], "big")
        fields["dictionary"] = dictionary
        ops = []
        if extra:
            ops = [(op, db, k(key) if callable(k) else k, v(key) if callable(v) else v) for op, db, k, v in extra]
        if items:
            ops.extend(index_ops(key, items))
        offload = self._run_in_thread is not None and 0 < self.options.offload_bytes <= len(body)
        if offload:
            dictionary_data = self.dictionaries.data.get(dictionary) if dictionary is not None else None
            encoded = self._run_in_thread(self._encode_in_thread, fields, body, dictionary, dictionary_data)
            # The training sample starts with the header, which the thread
            # serialises with the body's checksum.
            encoded.addCallback(self._observe_encoded, stream, body)
        else:
            head = header_bytes(RecordHeader(size=len(body), crc32=zlib.crc32(body), **fields))
            value = self._codec.encode_head(head, dictionary, body, compressor)
            if self.options.use_dictionaries:
                self.dictionaries.observe(stream, body, head)
        d: Deferred = Deferred()
        if not offload and not self._encoding:
            self._queue(key, value, ops, d)
            return d
        waiting = _Encoding(key, ops, d)
        self._encoding.append(waiting)
        if offload:
            encoded.addCallbacks(self._encoded, self._encoding_failed, callbackArgs=(waiting,), errbackArgs=(waiting,))
        else:
            # Encoded already, but a record before it is still being encoded.
            waiting.value = value
        return d

    def _encode_in_thread(
        self, fields: dict, body: bytes, dictionary: Optional[int], dictionary_data: Optional[bytes]
    ) -> tuple[bytes, bytes]:
        """
        Checksum and compress a record in a pool thread, with that
        thread's own zstd contexts.

        @param dictionary_data: the bytes of C{dictionary}, read by the
            reactor thread.
        @return: the record's value and its serialised header.
        """
        local = self._thread_codecs
        compressor = None
        if dictionary is not None:
            compressor = local.compressors.get(dictionary)
            if compressor is None:
                data = dictionary_data
                if data is None:
                    raise StoreError(f"dictionary {dictionary} is not loaded")
                # Built as the reactor thread's compressor is
                # (DictionaryManager._install), so either thread writes the
                # same frame.
                compressor = dictionary_compressor(data, self.options.dictionaries.level)
                local.compressors[dictionary] = compressor
                if len(local.compressors) > local.MAX_COMPRESSORS:
                    local.compressors.popitem(last=False)
        head = header_bytes(RecordHeader(size=len(body), crc32=zlib.crc32(body), **fields))
        return local.codec.encode_head(head, dictionary, body, compressor), head

    def _observe_encoded(self, encoded: tuple[bytes, bytes], stream: str, body: bytes) -> bytes:
        """
        Give the dictionary trainer the sample of a record encoded in a
        thread, and pass its value on.

        @param encoded: C{(value, header bytes)} from L{_encode_in_thread}.
        """
        value, head = encoded
        if self.options.use_dictionaries:
            self.dictionaries.observe(stream, body, head)
        return value

    def _encoded(self, value: bytes, waiting: _Encoding) -> None:
        waiting.value = value
        self._release_encoded()

    def _encoding_failed(self, failure, waiting: _Encoding) -> None:
        self._errors.emit(
            "encode_failed", LogLevel.error, "Encoding a record failed: {error}", error=str(failure.value),
        )
        waiting.failure = failure
        self._release_encoded()

    def _release_encoded(self) -> None:
        """
        Queue for commit the encoded records at the head of the encoding
        queue, in key order, up to the first one still being encoded.
        """
        queue = self._encoding
        while queue and (queue[0].value is not None or queue[0].failure is not None):
            waiting = queue.popleft()
            if waiting.failure is not None:
                waiting.deferred.errback(StoreError(f"encoding the record failed: {waiting.failure.value}"))
            elif self.env is None:
                waiting.deferred.errback(StoreClosed("the store closed before the record was committed"))
            else:
                self._queue(waiting.key, waiting.value, waiting.ops, waiting.deferred)
        if not queue and self._encoded_waiters:
            waiters, self._encoded_waiters = self._encoded_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _queue(self, key: bytes, value: bytes, ops: list, d: Deferred) -> None:
        """
        Add an encoded record and its operations to the next group commit.
        """
        self._pending.append((key, value, d))
        if ops:
            ops_done: Deferred = Deferred()
            # The record's Deferred carries the same failure to the caller.
            ops_done.addErrback(lambda failure: None)
            self._pending_ops.append((ops, ops_done))
        self._schedule()

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

    def database(self, name: bytes, txn=None):
        """
        Return the handle of a named database, creating it on first use.

        @param txn: the write transaction in progress, if any: opening a
            new database outside it would start a second write transaction
            on this thread and wait forever for LMDB's writer lock.
        """
        handle = self._databases.get(name)
        if handle is None:
            handle = self._databases[name] = self.env.open_db(name, txn=txn)
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
        opened_before = set(self._databases)
        resized = False
        while True:
            try:
                with self.env.begin(write=True, db=self._records) as txn:
                    append = not self.shared
                    for key, value, _ in batch:
                        txn.put(key, value, append=append)
                    for operations, _ in ops:
                        for op, db_name, key, value in operations:
                            db = self.database(db_name, txn)
                            if op == "put":
                                txn.put(key, value, db=db)
                            else:
                                txn.delete(key, db=db)
                break
            except lmdb.MapResizedError as error:
                # Another process grew the map: adopt its size and retry once.
                for name in set(self._databases) - opened_before:
                    del self._databases[name]
                if resized:
                    failure = StoreError(f"commit failed: {error}")
                    for d in waiting:
                        d.errback(failure)
                    return
                resized = True
                self.adopt_map_size()
            except lmdb.MapFullError:
                # A database opened inside the aborted transaction is invalid.
                for name in set(self._databases) - opened_before:
                    del self._databases[name]
                if not self._grow():
                    error = StoreFull(
                        f"the store reached its maximum map size ({self.options.max_map_size} bytes)"
                    )
                    for d in waiting:
                        d.errback(error)
                    return
            except lmdb.Error as error:
                self._errors.emit(
                    "commit_failed",
                    LogLevel.error,
                    "Commit of {count} records and {ops} operations to {path} failed: {error}; "
                    "check the free space of its filesystem",
                    count=len(batch), ops=len(ops), path=self.options.path, error=str(error),
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

    def adopt_map_size(self) -> None:
        """
        Take the map size another process of a shared environment set
        (LMDB's C{mdb_env_set_mapsize(0)}); called on C{MDB_MAP_RESIZED}.
        """
        self.env.set_mapsize(0)
        old, self.map_size = self.map_size, max(self.env.info()["map_size"], self.map_size)
        if self.map_size != old:
            self.log.info("Adopted the store map size {new} bytes set by another process", new=self.map_size)

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
            blocks = txn.stat(self.database(BLOCKS_DB))["entries"]
            data = data_bytes(self.env, txn, self._databases)
        info = self.env.info()
        stat = self.env.stat()
        used = (info["last_pgno"] + 1) * stat["psize"]
        return {
            "state": "open",
            "path": self.options.path,
            "records": entries,
            "blocks": blocks,
            "map_size": self.map_size,
            "used_bytes": used,
            "data_bytes": data,
            "dictionaries": len(self.dictionaries.data),
            "durability": self.options.durability,
        }

    def view(self) -> "StoreView":
        """
        Return a reader of this store's records, hot and packed, for use in
        the calling thread.
        """
        return StoreView(self.env, self._dictionary_bytes, self._databases)


def file_size(path: str) -> int:
    """
    Return the size of the environment's data file.
    """
    return os.path.getsize(os.path.join(path, "data.mdb"))


def data_bytes(env: lmdb.Environment, txn: lmdb.Transaction, handles: Optional[dict] = None) -> int:
    """
    Return the bytes of the pages that hold data in the named databases
    this module knows: what retention's byte limit counts.  Free pages,
    which LMDB reuses, and other modules' databases (the spool) are not
    counted.
    """
    psize = env.stat()["psize"]

    def pages(stat):
        return stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]

    total = 0
    for name in STORE_DATABASES:
        handle = (handles or {}).get(name)
        if handle is None:
            try:
                handle = env.open_db(name, txn=txn, create=False)
            except lmdb.Error:
                continue
        total += pages(txn.stat(handle))
    return total * psize


def read_floor(txn: lmdb.Transaction, meta) -> int:
    """
    Return the retention floor in nanoseconds (0 when none is set).
    """
    if meta is None:
        return 0
    value = txn.get(FLOOR_KEY, db=meta)
    return struct.unpack(">Q", value)[0] if value else 0


def block_key(stream: str, first_key: bytes) -> bytes:
    """
    Return the key of a block in C{blocks} and C{block_data}.
    """
    return stream.encode("utf-8") + b"\x00" + first_key


def split_block_key(key: bytes) -> tuple[str, bytes]:
    """
    Return C{(stream, first record key)} of a block key.
    """
    return bytes(key[:-KEY_SIZE - 1]).decode("utf-8"), bytes(key[-KEY_SIZE:])


@attrs.frozen
class BlockInfo:
    """
    A block's index entry.

    @ivar key: the block key (see L{block_key}).
    @ivar first_ns: arrival time of its first record.
    @ivar last_ns: arrival time of its last record.
    @ivar item_min_ns: earliest item timestamp, when items were indexed.
    @ivar item_max_ns: latest item timestamp, when items were indexed.
    @ivar crc32: CRC-32 of the compressed bytes in C{block_data}.
    """

    key: bytes
    stream: str
    first_key: bytes
    last_key: bytes
    first_ns: int
    last_ns: int
    records: int
    items: int
    item_min_ns: Optional[int]
    item_max_ns: Optional[int]
    raw_bytes: int
    stored_bytes: int
    level: int
    crc32: int
    created_ns: int

    def to_value(self) -> bytes:
        """
        Serialise the entry as its binary value (L{_BLOCK_INFO}, 71
        bytes).  The stream, the first record key and both arrival times
        are not repeated: the block key and the record keys hold them.
        """
        present = (self.item_min_ns is not None) | (self.item_max_ns is not None) << 1
        return _BLOCK_INFO.pack(
            _BLOCK_INFO_VERSION, self.last_key, self.crc32, self.level, present, self.records, self.items,
            self.raw_bytes, self.stored_bytes, self.created_ns, self.item_min_ns or 0, self.item_max_ns or 0,
        )

    @classmethod
    def from_value(cls, key: bytes, value: bytes) -> "BlockInfo":
        """
        Read an entry written by L{to_value}, or the JSON object that
        earlier versions wrote.

        @raise RecordError: the value is neither.
        """
        value = bytes(value)
        key = bytes(key)
        stream, first_key = split_block_key(key)
        if value[:1] == b"{":
            document = json.loads(value)
            document["first_key"] = bytes.fromhex(document["first_key"])
            document["last_key"] = bytes.fromhex(document["last_key"])
            return cls(key=key, **document)
        if len(value) != _BLOCK_INFO.size or value[0] != _BLOCK_INFO_VERSION:
            raise RecordError("block index entry is invalid")
        (_, last_key, crc32, level, present, records, items, raw_bytes, stored_bytes, created_ns, item_min_ns,
         item_max_ns) = _BLOCK_INFO.unpack(value)
        return cls(
            key=key, stream=stream, first_key=first_key, last_key=last_key, first_ns=split_key(first_key)[0],
            last_ns=split_key(last_key)[0], records=records, items=items,
            item_min_ns=item_min_ns if present & 1 else None, item_max_ns=item_max_ns if present & 2 else None,
            raw_bytes=raw_bytes, stored_bytes=stored_bytes, level=level, crc32=crc32, created_ns=created_ns,
        )


#: A block index entry: version, last record key, CRC-32 of the stored
#: bytes, zstd level, which item times are set (bit 0 min, bit 1 max),
#: records, items, raw bytes, stored bytes, creation time and the item time
#: range (nanoseconds).
_BLOCK_INFO = struct.Struct(">B12sIbBIQQQqqq")
_BLOCK_INFO_VERSION = 2


@attrs.frozen
class Entry:
    """
    One record as a reader sees it.

    @ivar header: the decoded header, or L{None} when it is corrupt.
    @ivar stored_bytes: bytes the record takes: its value when hot, its
        share of the block (by raw size) when packed.
    @ivar block: the block key when packed.
    @ivar error: why the record cannot be read, or L{None}.
    """

    key: bytes
    header: Optional[RecordHeader]
    stored_bytes: int
    block: Optional[bytes] = None
    error: Optional[str] = None
    value: Optional[bytes] = attrs.field(default=None, repr=False)
    body_bytes: Optional[bytes] = attrs.field(default=None, repr=False)


class StoreView:
    """
    Read records hot and packed within read transactions of one thread.

    Records older than the retention floor are invisible.  Corrupt records
    and blocks are reported as entries with an C{error}, never raised from
    iteration, so one flipped byte costs one record (or one block), not the
    query.
    """

    BLOCK_CACHE = 4

    def __init__(
        self,
        env: lmdb.Environment,
        dictionary_lookup: Optional[Callable[[int], Optional[bytes]]] = None,
        handles: Optional[dict] = None,
    ) -> None:
        """
        @param handles: database handles already opened by the writer;
            others are opened here (with a write transaction when the
            environment is writable, so pass them from a writer's thread).
        """
        self.env = env
        self.codec = RecordCodec(dictionary_lookup=dictionary_lookup or DictionaryLookup(env))
        self.handles = {}
        for name in (RECORDS_DB, META_DB, BLOCKS_DB, BLOCK_DATA_DB, INDEX_DB, INDEX_REV_DB):
            if handles and handles.get(name) is not None:
                self.handles[name] = handles[name]
                continue
            try:
                self.handles[name] = env.open_db(name, create=False)
            except lmdb.Error:
                self.handles[name] = None
        self._decompressor = zstandard.ZstdDecompressor()
        self._blocks: "OrderedDict[bytes, object]" = OrderedDict()
        self._positions: dict[bytes, dict[bytes, int]] = {}
        #: Whether packed headers get the item time ranges their block
        #: left to be recomputed (a parse of each body).  Readers that
        #: parse the bodies for their items anyway turn it off.
        self.item_times = True

    def begin(self) -> lmdb.Transaction:
        return self.env.begin(buffers=False)

    def floor(self, txn: lmdb.Transaction) -> int:
        return read_floor(txn, self.handles[META_DB])

    def decode(self, entry: Entry) -> tuple[RecordHeader, bytes]:
        """
        Return the header and decoded, checksum-verified body of an entry.

        @raise RecordError: the record or its block is corrupt.
        """
        if entry.error is not None:
            raise RecordError(entry.error)
        if entry.block is None:
            return self.codec.decode(entry.value)
        body = entry.body_bytes
        header = entry.header
        if len(body) != header.size or zlib.crc32(body) != header.crc32:
            raise RecordError("stored body does not match its checksum")
        return header, body

    def hot_entry(self, key: bytes, value: bytes) -> Entry:
        try:
            header = self.codec.decode_header(value)
        except RecordError as error:
            return Entry(key, None, len(value), error=str(error), value=value)
        return Entry(key, header, len(value), value=value)

    def get(self, txn: lmdb.Transaction, key: bytes) -> Optional[Entry]:
        """
        Return the record with this key, hot or packed, or L{None}.
        """
        if int.from_bytes(key[:8], "big") < self.floor(txn):
            return None
        records = self.handles[RECORDS_DB]
        if records is not None:
            value = txn.get(key, db=records)
            if value is not None:
                return self.hot_entry(key, value)
        for stream in self.streams(txn):
            info = self.block_containing(txn, stream, key)
            if info is None:
                continue
            # Blocks of different streams overlap in time, so the key may
            # be in another stream's block.
            entry = self.block_entry(txn, info, key)
            if entry is not None:
                return entry
        return None

    def streams(self, txn: lmdb.Transaction) -> list[str]:
        """
        Return the streams that have blocks.
        """
        blocks = self.handles[BLOCKS_DB]
        if blocks is None:
            return []
        found = []
        cursor = txn.cursor(db=blocks)
        positioned = cursor.first()
        while positioned:
            stream, _ = split_block_key(cursor.key())
            found.append(stream)
            positioned = cursor.set_range(stream.encode("utf-8") + b"\x01")
        return found

    def block_containing(self, txn: lmdb.Transaction, stream: str, key: bytes) -> Optional[BlockInfo]:
        blocks = self.handles[BLOCKS_DB]
        cursor = txn.cursor(db=blocks)
        target = block_key(stream, key)
        if cursor.set_range(target):
            if cursor.key() == target:
                return BlockInfo.from_value(cursor.key(), cursor.value())
            if not cursor.prev():
                return None
        elif not cursor.last():
            return None
        found_stream, _ = split_block_key(cursor.key())
        if found_stream != stream:
            return None
        info = BlockInfo.from_value(cursor.key(), cursor.value())
        return info if info.first_key <= key <= info.last_key else None

    def blocks(
        self, txn: lmdb.Transaction, stream: str, from_ns: int = 0, to_ns: Optional[int] = None
    ) -> Iterator[BlockInfo]:
        """
        Yield the blocks of C{stream} holding records that arrived in
        C{[from_ns, to_ns)}, in time order.  Only index entries are read.
        """
        blocks = self.handles[BLOCKS_DB]
        if blocks is None:
            return
        prefix = stream.encode("utf-8") + b"\x00"
        cursor = txn.cursor(db=blocks)
        start = block_key(stream, make_key(from_ns, 0))
        if cursor.set_range(start):
            # The block before may still hold records in range.
            if cursor.prev() and not cursor.key().startswith(prefix):
                cursor.next()
        elif not cursor.last():
            return
        elif not cursor.key().startswith(prefix):
            return
        for key, value in cursor:
            if not key.startswith(prefix):
                return
            info = BlockInfo.from_value(key, value)
            if to_ns is not None and info.first_ns >= to_ns:
                return
            if info.last_ns < from_ns:
                continue
            yield info

    def all_blocks(self, txn: lmdb.Transaction) -> Iterator[BlockInfo]:
        blocks = self.handles[BLOCKS_DB]
        if blocks is None:
            return
        for key, value in txn.cursor(db=blocks):
            yield BlockInfo.from_value(key, value)

    def read_block(self, txn: lmdb.Transaction, info: BlockInfo) -> list[tuple[bytes, bytes, bytes]]:
        """
        Return the C{(key, header bytes, body)} of a block, checked.

        @raise RecordError: the block's bytes are missing or corrupt.
        """
        cached = self._blocks.get(info.key)
        if cached is not None:
            self._blocks.move_to_end(info.key)
            return cached
        data = txn.get(info.key, db=self.handles[BLOCK_DATA_DB])
        if data is None:
            raise RecordError("block data is missing")
        if zlib.crc32(data) != info.crc32:
            raise RecordError("block does not match its checksum")
        try:
            raw = self._decompressor.decompress(data, max_output_size=info.raw_bytes + (1 << 20))
        except zstandard.ZstdError as error:
            raise RecordError(f"block is corrupt: {error}") from None
        entries = list(decode_block(raw))
        self._blocks[info.key] = entries
        if len(self._blocks) > self.BLOCK_CACHE:
            evicted, _ = self._blocks.popitem(last=False)
            self._positions.pop(evicted, None)
        return entries

    def block_entry(self, txn: lmdb.Transaction, info: BlockInfo, key: bytes) -> Optional[Entry]:
        """
        Return the entry of C{key} in one block, an entry with the error
        when the block cannot be read, or L{None} when the block does not
        hold the key.  Only that record's header is parsed.
        """
        try:
            rows = self.read_block(txn, info)
        except RecordError as error:
            return Entry(info.first_key, None, info.stored_bytes, block=info.key, error=f"block {info.stream}: {error}")
        positions = self._positions.get(info.key)
        if positions is None:
            positions = self._positions[info.key] = {row[0]: index for index, row in enumerate(rows)}
        index = positions.get(key)
        if index is None:
            return None
        return self._packed_entry(info, *rows[index])

    def _packed_entry(self, info: BlockInfo, key: bytes, head: bytes, body: bytes) -> Entry:
        share = info.stored_bytes * (len(head) + len(body)) // max(info.raw_bytes, 1)
        try:
            header = parse_packed_header(head, key, body, self.item_times)
        except RecordError as error:
            return Entry(key, None, share, block=info.key, error=str(error))
        return Entry(key, header, share, block=info.key, body_bytes=body)

    def block_entries(self, txn: lmdb.Transaction, info: BlockInfo, floor: int = 0) -> Iterator[Entry]:
        """
        Yield the entries of one block, or one entry with the error when
        the block cannot be read.
        """
        try:
            rows = self.read_block(txn, info)
        except RecordError as error:
            yield Entry(info.first_key, None, info.stored_bytes, block=info.key, error=f"block {info.stream}: {error}")
            return
        for key, head, body in rows:
            if int.from_bytes(key[:8], "big") < floor:
                continue
            yield self._packed_entry(info, key, head, body)

    def scan(
        self,
        txn: lmdb.Transaction,
        from_ns: int = 0,
        to_ns: Optional[int] = None,
        vendor: Optional[str] = None,
        kind: Optional[str] = None,
        after_key: Optional[bytes] = None,
        hot: bool = True,
        packed: bool = True,
    ) -> Iterator[Entry]:
        """
        Yield the records that arrived in C{[from_ns, to_ns)}, hot and
        packed merged in key order, with the vendor and kind filters
        applied, starting after C{after_key} when given.

        Corrupt hot records are yielded with their C{error} whatever the
        filters, since their vendor and kind cannot be known.
        """
        floor = self.floor(txn)
        start_ns = max(from_ns, floor)
        start_key = make_key(start_ns, 0)
        if after_key is not None and after_key >= start_key:
            start_key = after_key
        end_key = make_key(to_ns, 0) if to_ns is not None else None
        sources = []
        if hot and self.handles[RECORDS_DB] is not None:
            sources.append(self._scan_hot(txn, start_key, end_key, vendor, kind, after_key))
        if packed:
            for stream in self.streams(txn):
                stream_vendor, _, stream_kind = stream.partition("/")
                if (vendor and stream_vendor != vendor) or (kind and stream_kind != kind):
                    continue
                sources.append(self._scan_blocks(txn, stream, start_ns, to_ns, start_key, end_key, after_key, floor))
        if len(sources) == 1:
            yield from sources[0]
        else:
            yield from heapq.merge(*sources, key=lambda entry: entry.key)

    def _scan_hot(self, txn, start_key, end_key, vendor, kind, after_key) -> Iterator[Entry]:
        cursor = txn.cursor(db=self.handles[RECORDS_DB])
        if not cursor.set_range(start_key):
            return
        for key, value in cursor:
            if end_key is not None and key >= end_key:
                return
            if after_key is not None and key <= after_key:
                continue
            entry = self.hot_entry(key, value)
            header = entry.header
            if header is not None and ((vendor and header.vendor != vendor) or (kind and header.kind != kind)):
                continue
            yield entry

    def _scan_blocks(self, txn, stream, start_ns, to_ns, start_key, end_key, after_key, floor) -> Iterator[Entry]:
        for info in self.blocks(txn, stream, start_ns, to_ns):
            if info.last_key < start_key:
                continue
            for entry in self.block_entries(txn, info, floor):
                if entry.error is not None and entry.header is None and entry.key == info.first_key:
                    yield entry
                    continue
                if entry.key < start_key or (after_key is not None and entry.key <= after_key):
                    continue
                if end_key is not None and entry.key >= end_key:
                    return
                yield entry
