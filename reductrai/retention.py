"""
Retention: the oldest data goes first, in bounded batches off the hot path.

Two limits apply: C{retention.max_age} (records older than that go) and
C{retention.max_bytes} (while the data pages exceed it, the oldest records
go).  Each pass moves the retention floor (a time kept in C{meta}; readers
hide every record older than it, see L{reductrai.store.StoreView}), then
deletes at most L{RetentionOptions.batch} hot records, their index entries
and every block whose newest record is below the floor, through the
store's group commit.  Later passes continue where a batch stopped.  LMDB
puts the freed pages on its free list and reuses them for new writes; the
file itself only shrinks with C{reductrai-inspect compact}.

The spool keeps its own copy of each body in its own database, which
retention never touches.  When a deleted record is still referenced by an
undelivered spool entry, that is counted (L{Retention.spool_referenced}) and
logged, through the C{spool_references} callable the spool provides.
"""

from __future__ import annotations

import struct
import time
from typing import Callable, Optional

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from reductrai.indexes import INDEX_DB, INDEX_REV_DB, reverse_keys
from reductrai.record import make_key
from reductrai.store import BLOCK_DATA_DB, BLOCKS_DB, FLOOR_KEY, META_DB, RECORDS_DB, RecordStore, data_bytes

DAY = 86400.0


@attrs.frozen
class RetentionOptions:
    """
    @ivar max_age: seconds records are kept; 0 keeps them forever.
    @ivar max_bytes: data bytes kept at most; 0 for no limit.
    @ivar batch: hot records deleted per pass at most.
    @ivar interval: seconds between passes while there is work.
    @ivar idle_interval: seconds between passes once nothing is due.
    """

    max_age: float = 30 * DAY
    max_bytes: int = 0
    batch: int = 1000
    interval: float = 0.05
    idle_interval: float = 60.0


@attrs.frozen
class PassResult:
    """
    What one retention pass did.
    """

    floor_ns: int
    records: int
    blocks: int
    block_records: int
    spool_referenced: int

    @property
    def deleted(self) -> bool:
        return bool(self.records or self.blocks)


class Retention:
    """
    Apply the retention limits to a store in bounded passes.

    @ivar spool_references: C{(txn, keys) -> int}, how many of these
        record keys undelivered spool entries reference; L{None} when no
        spool is running.
    @ivar records_deleted: hot records deleted since start.
    @ivar blocks_deleted: blocks deleted since start.
    @ivar spool_referenced: deleted records still referenced by the spool.
    """

    log = Logger()

    def __init__(
        self,
        store: RecordStore,
        reactor,
        options: RetentionOptions = RetentionOptions(),
        clock_ns: Callable[[], int] = time.time_ns,
        spool_references: Optional[Callable] = None,
    ) -> None:
        self.store = store
        self.options = options
        self._reactor = reactor
        self._clock_ns = clock_ns
        self.spool_references = spool_references
        self._call = None
        self._running = False
        self._in_flight: Optional[Deferred] = None
        self.records_deleted = 0
        self.blocks_deleted = 0
        self.spool_referenced = 0

    def start(self) -> None:
        self._running = True
        self._schedule(self.options.interval)

    def stop(self) -> Deferred:
        self._running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return self._in_flight if self._in_flight is not None else succeed(None)

    def _schedule(self, delay: float) -> None:
        if self._running and (self._call is None or not self._call.active()):
            self._call = self._reactor.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._call = None
        if not self._running or not self.store.is_open or self._in_flight is not None:
            return

        def next_pass(result):
            if isinstance(result, PassResult) and result.deleted:
                self._schedule(self.options.interval)
            else:
                self._schedule(self.options.idle_interval)
            return None

        def failed(failure):
            self.log.failure("Retention pass failed", failure)

        self.run_pass().addErrback(failed).addBoth(next_pass)

    def _due_floor(self, view, txn, floor: int) -> int:
        """
        Return the floor the limits call for now, never lower than
        C{floor}.
        """
        options = self.options
        due = floor
        if options.max_age > 0:
            due = max(due, self._clock_ns() - int(options.max_age * 1e9))
        if options.max_bytes > 0:
            used = data_bytes(view.env, txn)
            if used > options.max_bytes:
                due = max(due, self._oldest_unit_end(view, txn, due) + 1)
        return due

    def _oldest_unit_end(self, view, txn, floor: int) -> int:
        """
        Return the arrival time of the newest record in the oldest unit
        still stored at or above C{floor}: the oldest batch of hot records
        or the oldest block, whichever is older.
        """
        candidates = []
        records = view.handles[RECORDS_DB]
        if records is not None:
            cursor = txn.cursor(db=records)
            if cursor.set_range(make_key(floor, 0)):
                count = 0
                last = None
                first = None
                for key in cursor.iternext(keys=True, values=False):
                    last = key
                    first = first or key
                    count += 1
                    if count >= self.options.batch:
                        break
                first_ns = int.from_bytes(first[:8], "big") if count else None
                if last is not None:
                    candidates.append((int.from_bytes(bytes(last)[:8], "big"), first_ns))
        for stream in view.streams(txn):
            for info in view.blocks(txn, stream, floor):
                if info.last_ns >= floor:
                    candidates.append((info.last_ns, info.first_ns))
                    break
        if not candidates:
            return floor
        # The unit whose oldest record is oldest goes first.
        candidates.sort(key=lambda pair: (pair[1] if pair[1] is not None else pair[0]))
        return candidates[0][0]

    def run_pass(self) -> Deferred:
        """
        Move the floor as the limits require and delete one batch of what
        is below it.

        @return: a L{Deferred} firing with a L{PassResult} once committed.
        """
        view = self.store.view()
        with view.begin() as txn:
            floor = view.floor(txn)
            due = self._due_floor(view, txn, floor)
            hot_keys = []
            records = view.handles[RECORDS_DB]
            if records is not None:
                cursor = txn.cursor(db=records)
                end = make_key(due, 0)
                if cursor.first():
                    for key in cursor.iternext(keys=True, values=False):
                        if key >= end or len(hot_keys) >= self.options.batch:
                            break
                        hot_keys.append(bytes(key))
            blocks = []
            for stream in view.streams(txn):
                for info in view.blocks(txn, stream, 0):
                    if info.last_ns >= due:
                        break
                    blocks.append(info)
            ops: list = []
            if due != floor:
                ops.append(("put", META_DB, FLOOR_KEY, struct.pack(">Q", due)))
            reverse = view.handles[INDEX_REV_DB]
            block_records = sum(info.records for info in blocks)
            deleted_keys = list(hot_keys)
            for info in blocks:
                ops.append(("delete", BLOCKS_DB, info.key, None))
                ops.append(("delete", BLOCK_DATA_DB, info.key, None))
            for key in hot_keys:
                ops.append(("delete", RECORDS_DB, key, None))
            # Index entries of hot and packed records alike: C{index_rev}
            # is keyed by record key, so the oldest of them go first.
            if reverse is not None:
                cursor = txn.cursor(db=reverse)
                end = make_key(due, 0)
                count = 0
                if cursor.first():
                    for key, value in cursor:
                        if key >= end or count >= self.options.batch * 4:
                            break
                        count += 1
                        ops.append(("delete", INDEX_REV_DB, bytes(key), None))
                        ops.extend(("delete", INDEX_DB, index_key, None) for index_key in reverse_keys(value))
            referenced = 0
            if self.spool_references is not None and (deleted_keys or blocks):
                try:
                    referenced = int(self.spool_references(txn, deleted_keys, blocks))
                except Exception as error:
                    self.log.warn("Counting spool references failed: {error}", error=str(error))
        result = PassResult(due, len(hot_keys), len(blocks), block_records, referenced)
        if not ops:
            return succeed(result)

        def committed(_):
            self.records_deleted += result.records + result.block_records
            self.blocks_deleted += result.blocks
            self.spool_referenced += referenced
            if result.deleted:
                self.log.info(
                    "Retention deleted {records} records and {blocks} blocks ({block_records} packed records) "
                    "older than {floor}",
                    records=result.records, blocks=result.blocks, block_records=result.block_records, floor=due,
                )
            if referenced:
                self.log.warn(
                    "Retention deleted {count} records that undelivered spool entries still reference; "
                    "the spool keeps its own copy of their bodies",
                    count=referenced,
                )
            return result

        def finished(outcome):
            self._in_flight = None
            return outcome

        d = self.store.submit(ops).addCallback(committed)
        d.addBoth(finished)
        self._in_flight = d
        return d

    def status(self) -> dict:
        return {
            "max_age": self.options.max_age,
            "max_bytes": self.options.max_bytes,
            "records_deleted": self.records_deleted,
            "blocks_deleted": self.blocks_deleted,
            "spool_referenced": self.spool_referenced,
        }
