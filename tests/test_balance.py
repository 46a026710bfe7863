"""
Tests for L{reductrai.balance}: the connection board shared by worker
processes and the accept wrapper that consults it.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from reductrai.balance import ConnectionBoard, balance_accepts
from reductrai.limits import ConnectionLimits


class FakePort:
    """
    The parts of a listening C{tcp.Port} that L{balance_accepts} uses:
    C{doRead} accepts up to C{numberAccepts} queued connections.
    """

    def __init__(self, queued: int) -> None:
        self.queued = queued
        self.accepted = 0
        self.numberAccepts = 100
        self.reading = True
        self.connected = True

    def doRead(self):
        accepting = min(self.queued, self.numberAccepts)
        self.queued -= accepting
        self.accepted += accepting

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


def boards(tmp_path, workers: int = 2) -> list[ConnectionBoard]:
    path = str(tmp_path / "workers.board")
    first = ConnectionBoard(path, workers, 0)
    first.open(create=True)
    others = [ConnectionBoard(path, workers, worker) for worker in range(1, workers)]
    for board in others:
        board.open(create=False)
    return [first] + others


def test_board_counts_are_shared(tmp_path):
    """
    What one worker publishes, every other worker reads from the file.
    """
    worker0, reader, worker2 = boards(tmp_path, 3)
    worker0.publish(4)
    worker2.publish(1)
    assert reader.counts() == [4, 0, 1]
    assert (tmp_path / "workers.board").stat().st_mode & 0o777 == 0o600


def test_board_wait_beyond_slack(tmp_path):
    """
    A worker waits only while it has more than C{slack} connections
    above the least loaded other worker.
    """
    worker0, worker1, worker2 = boards(tmp_path, 3)
    worker0.publish(3)
    worker1.publish(2)
    worker2.publish(1)
    assert worker0.should_wait()
    assert not worker1.should_wait()
    worker2.publish(2)
    assert not worker0.should_wait()


def test_board_unopened_never_waits(tmp_path):
    """
    A board that is not mapped (one worker, or the file could not be
    opened) publishes nothing and never makes a worker wait.
    """
    board = ConnectionBoard(str(tmp_path / "missing"), 2, 0)
    board.publish(9)
    assert board.counts() == []
    assert not board.should_wait()


def test_limits_publish_open_connections(tmp_path):
    """
    Connections opened and closed on the ingest limits reach the board.
    """
    worker0, worker1 = boards(tmp_path)
    limits = ConnectionLimits(board=worker1)
    limits.opened()
    limits.opened()
    limits.closed()
    assert worker0.counts() == [0, 1]


def test_accept_waits_once_then_accepts(tmp_path):
    """
    A loaded worker stops reading its listening socket for C{pause}
    seconds instead of accepting, then accepts one connection even if it
    is still the most loaded, so that a stale count cannot stop it.
    """
    worker0, worker1 = boards(tmp_path)
    worker0.publish(5)
    clock = Clock()
    port = FakePort(queued=3)
    balance_accepts(port, worker0, clock)
    port.doRead()
    assert port.accepted == 0
    assert not port.reading
    clock.advance(worker0.pause)
    assert port.reading
    port.doRead()
    assert port.accepted == 1
    port.doRead()
    assert port.accepted == 1


def test_accept_one_when_balanced(tmp_path):
    """
    A worker with no more connections than the others accepts at once,
    one connection per readiness event.
    """
    worker0, worker1 = boards(tmp_path)
    worker0.publish(2)
    worker1.publish(2)
    port = FakePort(queued=3)
    balance_accepts(port, worker0, Clock())
    port.doRead()
    port.doRead()
    assert port.accepted == 2
    assert port.reading


def test_accept_after_port_closed(tmp_path):
    """
    A port that stopped listening during the pause is not read again.
    """
    worker0, worker1 = boards(tmp_path)
    worker0.publish(5)
    clock = Clock()
    port = FakePort(queued=1)
    balance_accepts(port, worker0, clock)
    port.doRead()
    port.connected = False
    clock.advance(worker0.pause)
    assert not port.reading
