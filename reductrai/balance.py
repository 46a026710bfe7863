"""
Spreading keep-alive connections over worker processes.

Worker processes share their listening sockets, and the kernel hands a new
connection to whichever process accepts first.  That is usually the one
that is idle at that moment, so a burst of connections opened while the
other workers finish their work lands on one process and stays there for
as long as the clients keep them alive.

A L{ConnectionBoard} is a small file in the data directory, mapped by
every worker, with one slot a worker holding its count of open ingest
connections.  A worker that has more open connections than the least loaded
other worker plus L{ConnectionBoard.slack} waits L{ConnectionBoard.pause}
seconds before it accepts, once, which leaves the connection to a less
loaded worker that is waiting in its reactor.  After the pause it accepts
anyway, so a stale slot (a worker that died) delays accepts but never
stops them.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Optional

from twisted.logger import Logger

_SLOT = struct.Struct("<q")


class ConnectionBoard:
    """
    Open ingest connections of every worker, shared through a mapped file.

    @ivar path: the board file.
    @ivar workers: the number of worker processes.
    @ivar worker: this process's worker id.
    @ivar slack: connections above the least loaded other worker that a
        worker still accepts without waiting.
    @ivar pause: seconds a worker above that waits before it accepts.
    """

    log = Logger()

    def __init__(self, path: str, workers: int, worker: int, slack: int = 1, pause: float = 0.005) -> None:
        self.path = path
        self.workers = workers
        self.worker = worker
        self.slack = slack
        self.pause = pause
        self._map: Optional[mmap.mmap] = None

    def open(self, create: bool) -> None:
        """
        Map the board file; with C{create} (worker 0, before it starts the
        others) write it anew with every count at 0.

        @raise OSError: the file cannot be created or opened.
        """
        size = _SLOT.size * self.workers
        if create:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, bytes(size))
            finally:
                os.close(fd)
        fd = os.open(self.path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size < size:
                raise OSError(f"connection board {self.path} has {os.fstat(fd).st_size} bytes, expected {size}")
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def close(self) -> None:
        """
        Unmap the board; the counts stop being published.
        """
        if self._map is not None:
            self._map.close()
            self._map = None

    def publish(self, count: int, worker: Optional[int] = None) -> None:
        """
        Write the open connection count of this worker (or of C{worker}).
        """
        if self._map is not None:
            _SLOT.pack_into(self._map, _SLOT.size * (self.worker if worker is None else worker), count)

    def counts(self) -> list[int]:
        """
        Return every worker's published count, by worker id.
        """
        if self._map is None:
            return []
        return [_SLOT.unpack_from(self._map, _SLOT.size * index)[0] for index in range(self.workers)]

    def should_wait(self) -> bool:
        """
        Return whether this worker has more than C{slack} connections
        above the least loaded other worker.
        """
        counts = self.counts()
        if len(counts) < 2:
            return False
        others = counts[: self.worker] + counts[self.worker + 1 :]
        return counts[self.worker] > min(others) + self.slack


def balance_accepts(port, board: ConnectionBoard, reactor) -> None:
    """
    Make a listening port accept one connection per readiness event and,
    when C{board} shows that this worker has more than its share, wait
    C{board.pause} seconds once before accepting.

    Twisted accepts up to a hundred connections per readiness event.  With
    several processes on one socket, that lets the first one awake take a
    whole burst.
    """
    original = port.doRead
    waited = [False]

    def resume() -> None:
        if port.connected:
            port.startReading()

    def doRead():
        port.numberAccepts = 1
        if not waited[0] and board.should_wait():
            waited[0] = True
            port.stopReading()
            reactor.callLater(board.pause, resume)
            return None
        waited[0] = False
        return original()

    port.numberAccepts = 1
    port.doRead = doRead
