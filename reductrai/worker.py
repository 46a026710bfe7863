"""
Several reactor processes serving the same ingest listeners
(C{server.workers}).

The twistd process is worker 0: it binds the listeners, opens the store
and starts workers 1 to N-1 with L{WorkerPool}, each a
C{python -m reductrai.worker} process that gets the listening sockets as
inherited descriptors and adopts them (C{reactor.adoptStreamPort}), with
the same TLS wrapping (L{reductrai.listeners.adopt_listener}).  The kernel
hands each new connection to whichever process accepts it first.  Every
process accepts one connection per wake-up, and one that has more
connections than another waits a few milliseconds first
(L{reductrai.balance}), so the connections spread over the processes.

A worker reads its settings from one JSON line on its standard input: its
id, the configuration file, its listeners, and every resolved setting
that is not a secret.  Those settings are applied as command-line
overrides, so the worker runs with exactly worker 0's values.  The
worker reads its secrets again from the same file and from the
environment it inherits.  Nothing secret is put on a command line or
added to the environment.  The standard input stays open:
its end (worker 0 gone, even killed) stops the worker.  The worker writes
its log events as JSON lines on its standard output; worker 0 logs them
with a C{worker} field.

Worker 0 restarts a worker that ends while it runs (after a delay that
doubles with each quick death), and on stop sends SIGTERM to each worker
by PID and waits for it: a worker stops as the daemon does, finishing its
requests in flight.  Only worker 0 serves the admin listeners and runs
the compactor, retention, dictionary training and the spool's drain loop.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from typing import Any, Callable, Optional

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger, LogLevel, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

#: Seconds before restarting a worker that ended; doubled for each worker
#: that ends within L{STABLE_AFTER} seconds of its start, up to L{MAX_BACKOFF}.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
STABLE_AFTER = 30.0

_FAMILIES = {socket.AF_INET: "AF_INET", socket.AF_INET6: "AF_INET6", socket.AF_UNIX: "AF_UNIX"}


def listener_specs(descriptions: list[str], ports: list, first_fd: int = 3) -> tuple[list[dict], dict[int, int]]:
    """
    Describe the listening ports a worker inherits.

    @param descriptions: the endpoint strings of C{ports}, in order.
    @return: the listener entries of a worker's start line and the
        C{childFDs} that map each of them to worker 0's descriptor.
    """
    specs = []
    child_fds = {}
    for index, (description, port) in enumerate(zip(descriptions, ports)):
        fd = first_fd + index
        specs.append({"description": description, "fd": fd, "family": _FAMILIES[port.socket.family]})
        child_fds[fd] = port.fileno()
    return specs, child_fds


def settings_overrides(settings) -> dict[str, Any]:
    """
    Return every resolved setting that is not a secret, keyed by setting,
    to hand to a worker as command-line overrides.
    """
    from reductrai.config import FIELDS

    overrides = {}
    for field in FIELDS:
        if field.kind == "secret":
            continue
        value = settings[field.key]
        if value is not None:
            overrides[field.key] = value
    return overrides


class _WorkerProtocol(protocol.ProcessProtocol):
    """
    One worker process seen from worker 0: relays its log lines and
    reports its end to the pool.
    """

    def __init__(self, pool: "WorkerPool", worker: int) -> None:
        self.pool = pool
        self.worker = worker
        self.started_at = 0.0
        self._buffers = {1: b"", 2: b""}
        self.ended: defer.Deferred = defer.Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD not in self._buffers:
            return
        lines = (self._buffers[childFD] + data).split(b"\n")
        self._buffers[childFD] = lines.pop()
        if len(self._buffers[childFD]) > 1 << 20:
            lines.append(self._buffers[childFD])
            self._buffers[childFD] = b""
        for line in lines:
            if childFD == 1:
                self.pool.relay_event(self.worker, line)
            else:
                self.pool.relay_text(self.worker, line)

    def processEnded(self, reason: Failure) -> None:
        for fd in (1, 2):
            if self._buffers[fd]:
                self.childDataReceived(fd, b"\n")
        self.pool.worker_ended(self, reason)
        self.ended.callback(None)


class WorkerPool(service.Service):
    """
    Start, supervise and stop the worker processes 1 to C{count - 1}.

    @ivar protocols: the running workers by id.
    @ivar started: the ids of the workers that have started serving at
        least once.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        count: int,
        start_line: Callable[[int], dict],
        child_fds: dict[int, int],
        stop_timeout: float,
        on_worker_ended: Optional[Callable[[int], None]] = None,
        argv: Optional[list[str]] = None,
    ) -> None:
        """
        @param start_line: builds the JSON document a worker reads first.
        @param child_fds: the listening descriptors every worker inherits,
            by descriptor number in the worker.
        @param stop_timeout: seconds a worker may take to stop after
            SIGTERM before it gets SIGKILL.
        @param on_worker_ended: called with the id of a worker that ended,
            before any restart.
        @param argv: the command of a worker (default: this interpreter
            with C{-m reductrai.worker}).
        """
        self.reactor = reactor
        self.count = count
        self._start_line = start_line
        self._child_fds = child_fds
        self._stop_timeout = stop_timeout
        self._on_worker_ended = on_worker_ended
        self._argv = argv or [sys.executable, "-m", "reductrai.worker"]
        self.protocols: dict[int, _WorkerProtocol] = {}
        self.started: set[int] = set()
        self._backoff: dict[int, float] = {}
        self._restarts: dict[int, object] = {}
        self.restarts = 0

    @property
    def pids(self) -> dict[int, int]:
        """
        The PID of each running worker, by id.
        """
        return {worker: p.transport.pid for worker, p in self.protocols.items() if p.transport and p.transport.pid}

    def startService(self) -> None:
        super().startService()
        for worker in range(1, self.count):
            self._spawn(worker)

    def _spawn(self, worker: int) -> None:
        self._restarts.pop(worker, None)
        if not self.running:
            return
        proto = _WorkerProtocol(self, worker)
        fds: dict[int, object] = {0: "w", 1: "r", 2: "r"}
        fds.update(self._child_fds)
        try:
            transport = self.reactor.spawnProcess(
                proto, self._argv[0], self._argv, env=dict(os.environ), path=os.getcwd(), childFDs=fds,
            )
        except OSError as failure:
            self.log.error("Cannot start worker {child}: {error}", child=worker, error=str(failure))
            self._schedule_restart(worker, 0.0)
            return
        proto.started_at = self.reactor.seconds()
        self.protocols[worker] = proto
        line = json.dumps(self._start_line(worker), separators=(",", ":")).encode("utf-8") + b"\n"
        transport.writeToChild(0, line)
        self.log.info("Started worker {child} (PID {pid})", child=worker, pid=transport.pid)

    def worker_ended(self, proto: _WorkerProtocol, reason: Failure) -> None:
        worker = proto.worker
        if self.protocols.get(worker) is proto:
            del self.protocols[worker]
        if self._on_worker_ended is not None:
            self._on_worker_ended(worker)
        status = reason.value
        detail = str(status.exitCode) if status.signal is None else f"signal {status.signal}"
        if not self.running:
            self.log.info("Worker {child} stopped ({status})", child=worker, status=detail)
            return
        lived = self.reactor.seconds() - proto.started_at
        self._schedule_restart(worker, lived)
        self.log.warn(
            "Worker {child} ended ({status}) after {lived:.1f} s; restarting it in {delay:.1f} s",
            child=worker, status=detail, lived=lived, delay=self._backoff[worker],
        )

    def _schedule_restart(self, worker: int, lived: float) -> None:
        previous = self._backoff.get(worker)
        if previous is None or lived >= STABLE_AFTER:
            delay = FIRST_BACKOFF
        else:
            delay = min(previous * 2, MAX_BACKOFF)
        self._backoff[worker] = delay
        self.restarts += 1
        self._restarts[worker] = self.reactor.callLater(delay, self._spawn, worker)

    def signal_all(self, name: str) -> None:
        """
        Send a signal (C{"HUP"}, C{"TERM"}, C{"KILL"}) to every running
        worker, by PID.
        """
        for proto in list(self.protocols.values()):
            try:
                proto.transport.signalProcess(name)
            except (error.ProcessExitedAlready, OSError):
                pass

    def stopService(self) -> defer.Deferred:
        """
        Stop every worker: SIGTERM, then SIGKILL for those still running
        after the stop timeout.

        @return: a L{Deferred} firing once every worker has ended.
        """
        super().stopService()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        waiting = [proto.ended for proto in self.protocols.values()]
        if not waiting:
            return defer.succeed(None)
        self.signal_all("TERM")
        deadline = self.reactor.callLater(self._stop_timeout, self._kill_remaining)
        done = defer.DeferredList(waiting)
        done.addBoth(lambda result: (deadline.active() and deadline.cancel(), None)[1])
        return done

    def _kill_remaining(self) -> None:
        if self.protocols:
            self.log.warn(
                "Workers {workers} did not stop within {timeout} s; killing them",
                workers=sorted(self.protocols), timeout=self._stop_timeout,
            )
            self.signal_all("KILL")

    def relay_event(self, worker: int, line: bytes) -> None:
        """
        Log one JSON log event of a worker here, with its C{worker} field.
        """
        text = line.strip(b"\x1e \r\n")
        if not text:
            return
        try:
            event = eventFromJSON(text.decode("utf-8", "replace"))
        except ValueError:
            self.relay_text(worker, line)
            return
        level = event.get("log_level")
        if event.get("serving") is True:
            self.started.add(worker)
        event["worker"] = worker
        event["log_system"] = f"{event.get('log_namespace', '-')}#{getattr(level, 'name', 'info')} worker={worker}"
        globalLogPublisher(event)

    def relay_text(self, worker: int, line: bytes) -> None:
        """
        Log one line a worker wrote outside its log (a crash before its
        logging started, an interpreter error).
        """
        text = line.rstrip(b"\r\n").decode("utf-8", "replace")
        if text:
            self.log.emit(
                LogLevel.warn, "Worker {worker} wrote: {line}", worker=worker, line=text,
                log_system=f"reductrai.worker#warn worker={worker}",
            )


@implementer(IReadDescriptor)
class _ParentWatch:
    """
    Stop the reactor when the standard input ends, because then worker 0,
    which has the other end, is gone.
    """

    def __init__(self, reactor, fd: int = 0) -> None:
        self.reactor = reactor
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def doRead(self):
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return None
        except OSError as failure:
            return error.ConnectionLost(str(failure))
        if not data:
            return error.ConnectionDone()
        return None

    def connectionLost(self, reason) -> None:
        if self.reactor.running:
            Logger().warn("Worker 0 is gone; stopping")
            self.reactor.stop()

    def logPrefix(self) -> str:
        return "worker-0-watch"


def _read_start_line(fd: int = 0) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            raise SystemExit("reductrai worker: standard input ended before the start line")
        data += chunk
    return json.loads(data)


def main() -> None:
    """
    Run one worker process (C{python -m reductrai.worker}), started by
    worker 0's L{WorkerPool}.
    """
    from twisted.logger import globalLogBeginner, jsonFileLogObserver

    start = _read_start_line()
    worker = int(start["worker"])
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stdout)], redirectStandardIO=False)

    from twisted.internet import reactor

    from reductrai.config import ConfigError, load_settings
    from reductrai.service import ReductraiService

    try:
        settings = load_settings(start.get("config"), os.environ, start.get("overrides") or {})
    except ConfigError as failure:
        sys.stderr.write(f"reductrai worker {worker}: invalid configuration: {failure}\n")
        raise SystemExit(2)
    listeners = [
        {"description": item["description"], "fd": int(item["fd"]), "family": getattr(socket, item["family"])}
        for item in start.get("listeners", [])
    ]
    daemon = ReductraiService(settings, reactor, exit_on_startup_error=True, worker=worker, inherited=listeners)
    # SIGINT from a terminal reaches the whole process group; worker 0
    # decides when the workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.set_blocking(0, False)
    reactor.addReader(_ParentWatch(reactor))
    daemon.privilegedStartService()
    reactor.callWhenRunning(daemon.startService)
    reactor.addSystemEventTrigger("before", "shutdown", daemon.stopService)
    reactor.run(installSignalHandlers=True)


if __name__ == "__main__":
    main()
