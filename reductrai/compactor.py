"""
The background compactor: packs older hot records into blocks.

Per-record compression of small requests leaves most of their redundancy
on the table; a block compresses many records of one stream (vendor and
kind) as one zstd frame at a high level, which finds it.  The compactor
works in bounded slices on the reactor: each slice reads at most
L{CompactorOptions.slice_records} hot records older than
L{CompactorOptions.min_age} and stops early when its time budget
(L{CompactorOptions.slice_seconds}) is spent.  Records collect in one
buffer per stream; a full buffer (by raw bytes or time span) is compressed
in a thread, and the block, its index entry and the deletion of its hot
records are committed together with the store's group commit on the
reactor, so readers see each record exactly once at any moment.

Blocks of a stream never overlap: records are read in key order, and each
stream's buffer is sealed in order.
"""

from __future__ import annotations

import time
import zlib
from typing import Callable, Optional

import attrs
import zstandard
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from reductrai.itemtimes import derive_item_times
from reductrai.record import ItemTimesDeriver, RecordHeader, block_v3_sections, header_bytes, make_key
from reductrai.store import BLOCK_DATA_DB, BLOCKS_DB, RECORDS_DB, BlockInfo, RecordStore, block_key


@attrs.frozen
class CompactorOptions:
    """
    @ivar min_age: seconds a record stays hot before it may be packed.
    @ivar block_max_bytes: raw bytes (headers and bodies) at which a
        stream's buffer is sealed into a block.
    @ivar buffer_max_bytes: raw bytes that all stream buffers may hold
        together; past it the largest buffer is sealed, smaller than
        C{block_max_bytes}.  Once caught up, a buffer is otherwise sealed
        only when its oldest record is older than C{min_age +
        block_max_seconds}, so that a quiet stream still fills its blocks.
    @ivar block_max_seconds: arrival-time span at which a buffer is sealed.
    @ivar level: zstd level of blocks.
    @ivar record_checksums: keep each record's CRC-32 from ingest in its
        block (4 bytes a record).  Otherwise a block keeps one digest of
        them, which reading the block checks against every body: a
        mismatch still fails the block, but cannot name the record.  The
        block's zstd content checksum and the CRC-32 of its compressed
        bytes detect damage at rest either way.
    @ivar slice_records: hot records read per slice at most.
    @ivar slice_seconds: time budget of one slice on the reactor.
    @ivar interval: seconds between slices while there is work.
    @ivar idle_interval: seconds between slices once caught up.
    """

    min_age: float = 300.0
    block_max_bytes: int = 4 * 1024 * 1024
    buffer_max_bytes: int = 16 * 1024 * 1024
    block_max_seconds: float = 3600.0
    level: int = 19
    record_checksums: bool = False
    slice_records: int = 256
    slice_seconds: float = 0.004
    interval: float = 0.01
    idle_interval: float = 10.0


@attrs.define
class _Buffer:
    stream: str
    entries: list = attrs.field(factory=list)
    raw_bytes: int = 0
    items: int = 0
    item_min_ns: Optional[int] = None
    item_max_ns: Optional[int] = None

    def add(self, key: bytes, header: RecordHeader, body: bytes) -> None:
        self.entries.append((key, header, body))
        self.raw_bytes += len(header_bytes(header)) + len(body)
        self.items += header.items or 0
        if header.item_min_ns is not None:
            self.item_min_ns = header.item_min_ns if self.item_min_ns is None else min(self.item_min_ns, header.item_min_ns)
        if header.item_max_ns is not None:
            self.item_max_ns = header.item_max_ns if self.item_max_ns is None else max(self.item_max_ns, header.item_max_ns)

    @property
    def first_ns(self) -> int:
        return int.from_bytes(self.entries[0][0][:8], "big")

    @property
    def last_ns(self) -> int:
        return int.from_bytes(self.entries[-1][0][:8], "big")


def compress_block(
    entries: list[tuple[bytes, RecordHeader, bytes]],
    level: int,
    record_checksums: bool = False,
    derive: Optional[ItemTimesDeriver] = None,
) -> bytes:
    """
    Lay out (L{reductrai.record.encode_block_v3}) and compress a block as
    one zstd frame with its content size and checksum (runs in a thread).

    @param entries: C{(key, header, decoded body)} in key order.
    @param record_checksums: keep every record's CRC-32 in the block.
    @param derive: leave the item time ranges out when this recomputes
        every one of them (see L{reductrai.record.block_v3_sections}).
    """
    sections = block_v3_sections(entries, record_checksums, derive)
    table, bodies = b"".join(sections[:-1]), sections[-1]
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    stream = compressor.compressobj(size=len(table) + len(bodies))
    # Ending a zstd block after the table gives the bodies their own entropy
    # tables (the table's random low bytes would flatten them) while both
    # share one window and one frame.
    return b"".join((
        stream.compress(table), stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK), stream.compress(bodies), stream.flush()
    ))


class Compactor:
    """
    Pack hot records older than C{min_age} into blocks, slice by slice.

    @ivar blocks_written: blocks committed since start.
    @ivar records_packed: records moved into blocks since start.
    @ivar raw_bytes_packed: raw header and body bytes packed since start.
    @ivar skipped: hot records left hot because they could not be read.
    """

    log = Logger()

    def __init__(
        self,
        store: RecordStore,
        reactor,
        options: CompactorOptions = CompactorOptions(),
        clock_ns: Callable[[], int] = time.time_ns,
        run_in_thread: Optional[Callable] = None,
    ) -> None:
        self.store = store
        self.options = options
        self._reactor = reactor
        self._clock_ns = clock_ns
        self._run = run_in_thread or (lambda f, *a: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *a))
        self._buffers: dict[str, _Buffer] = {}
        self._position: Optional[bytes] = None
        self._call = None
        self._sealing: Optional[Deferred] = None
        self._running = False
        self.blocks_written = 0
        self.records_packed = 0
        self.raw_bytes_packed = 0
        self.skipped = 0

    def start(self) -> None:
        """
        Start slicing; the store must be open.
        """
        self._running = True
        self._schedule(self.options.interval)

    def stop(self) -> Deferred:
        """
        Stop slicing.  A block being compressed is still committed.

        @return: a L{Deferred} firing once no block is in flight.
        """
        self._running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._buffers.clear()
        self._position = None
        return self._sealing if self._sealing is not None else defer.succeed(None)

    def _schedule(self, delay: float) -> None:
        if self._running and (self._call is None or not self._call.active()):
            self._call = self._reactor.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._call = None
        if not self._running or not self.store.is_open:
            return
        if self._sealing is not None:
            return
        caught_up = self.run_slice()
        sealing = self._seal_due(force=False, caught_up=caught_up)
        if sealing is not None:
            sealing.addBoth(lambda _: self._schedule(self.options.interval))
        else:
            self._schedule(self.options.idle_interval if caught_up else self.options.interval)

    def run_slice(self, min_age: Optional[float] = None) -> bool:
        """
        Read one bounded slice of hot records into the stream buffers.

        @return: whether no hot record old enough is left to read.
        """
        options = self.options
        age = options.min_age if min_age is None else min_age
        horizon = make_key(self._clock_ns() - int(age * 1e9), 0)
        deadline = time.monotonic() + options.slice_seconds
        view = self.store.view()
        count = 0
        with view.begin() as txn:
            cursor = txn.cursor(db=view.handles[RECORDS_DB])
            positioned = cursor.set_range(self._position + b"\x00") if self._position else cursor.first()
            if not positioned:
                return True
            for key, value in cursor:
                if key >= horizon:
                    return True
                self._position = key
                entry = view.hot_entry(key, value)
                try:
                    header, body = view.decode(entry)
                except Exception as error:
                    self.skipped += 1
                    self.log.warn("Left corrupt record {key} hot: {error}", key=key.hex(), error=str(error))
                    continue
                stream = header.stream
                buffer = self._buffers.get(stream)
                if buffer is None:
                    buffer = self._buffers[stream] = _Buffer(stream)
                buffer.add(key, header, body)
                count += 1
                if count >= options.slice_records or time.monotonic() >= deadline:
                    return False
                if buffer.raw_bytes >= options.block_max_bytes:
                    return False
        return True

    def _seal_due(self, force: bool, caught_up: bool) -> Optional[Deferred]:
        options = self.options
        now = self._clock_ns()
        for stream, buffer in list(self._buffers.items()):
            if not buffer.entries:
                continue
            full = buffer.raw_bytes >= options.block_max_bytes
            wide = buffer.last_ns - buffer.first_ns >= options.block_max_seconds * 1e9
            stale = caught_up and buffer.first_ns < now - (options.min_age + options.block_max_seconds) * 1e9
            if force or full or wide or stale:
                del self._buffers[stream]
                return self._seal(buffer)
        if sum(buffer.raw_bytes for buffer in self._buffers.values()) > options.buffer_max_bytes:
            largest = max(self._buffers.values(), key=lambda buffer: buffer.raw_bytes)
            del self._buffers[largest.stream]
            return self._seal(largest)
        return None

    def _seal(self, buffer: _Buffer) -> Deferred:
        level = self.options.level
        d = self._run(compress_block, buffer.entries, level, self.options.record_checksums, derive_item_times)

        def compressed(data: bytes):
            first_key, last_key = buffer.entries[0][0], buffer.entries[-1][0]
            info = BlockInfo(
                key=block_key(buffer.stream, first_key),
                stream=buffer.stream,
                first_key=first_key,
                last_key=last_key,
                first_ns=buffer.first_ns,
                last_ns=buffer.last_ns,
                records=len(buffer.entries),
                items=buffer.items,
                item_min_ns=buffer.item_min_ns,
                item_max_ns=buffer.item_max_ns,
                raw_bytes=buffer.raw_bytes,
                stored_bytes=len(data),
                level=level,
                crc32=zlib.crc32(data),
                created_ns=self._clock_ns(),
            )
            ops = [("put", BLOCKS_DB, info.key, info.to_value()), ("put", BLOCK_DATA_DB, info.key, data)]
            ops.extend(("delete", RECORDS_DB, key, None) for key, _, _ in buffer.entries)
            return self.store.submit(ops).addCallback(lambda _: committed(info))

        def committed(info: BlockInfo) -> BlockInfo:
            self.blocks_written += 1
            self.records_packed += info.records
            self.raw_bytes_packed += info.raw_bytes
            self.log.debug(
                "Packed {records} {stream} records into a block of {stored} bytes ({raw} raw)",
                records=info.records, stream=info.stream, stored=info.stored_bytes, raw=info.raw_bytes,
            )
            return info

        def failed(failure):
            self.log.failure("Packing a {stream} block failed", failure, stream=buffer.stream)
            # The records are still hot: read them again from the start.
            self._position = None
            self._buffers.clear()
            return None

        def done(result):
            self._sealing = None
            return result

        d.addCallback(compressed)
        d.addErrback(failed)
        d.addBoth(done)
        self._sealing = d
        return d

    async def compact_all(self, min_age: float = 0.0) -> int:
        """
        Pack every hot record older than C{min_age} seconds now, sealing
        partial blocks too (for tests, benchmarks and C{reductrai-inspect}).

        @return: the number of blocks written.
        """
        before = self.blocks_written
        if self._sealing is not None:
            await self._sealing
        while True:
            caught_up = self.run_slice(min_age)
            sealing = self._seal_due(force=caught_up, caught_up=caught_up)
            while sealing is not None:
                await sealing
                sealing = self._seal_due(force=caught_up, caught_up=caught_up)
            if caught_up and not any(b.entries for b in self._buffers.values()):
                break
        self._position = None
        return self.blocks_written - before
