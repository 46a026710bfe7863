"""
Several worker processes (C{server.workers}): the key and entry-id spaces
of each worker, and the real daemon run by twistd with two workers on
loopback ports, storing only and forwarding to a local upstream.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.task import Clock

from reductrai.record import split_key
from reductrai.spool.drain import Spool
from reductrai.spool.entries import SPOOL_DB, entry_time_ns, entry_worker, make_entry_id, upstream_id
from reductrai.spool.options import SpoolOptions
from reductrai.store import RecordStore, StoreOptions, StoreView, open_environment
from tests.spool_support import UPSTREAM, ScriptedForwarder, accept, header_fields
from tests.support import Upstream

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
API_KEY = "0123456789abcdef0123456789abcdef"


# Key and entry-id spaces


def _store(path: Path, worker: int, clock_ns: Callable[[], int]) -> RecordStore:
    store = RecordStore(StoreOptions(path=str(path), map_size=8 << 20, max_map_size=64 << 20, durability="none"), Clock(), clock_ns)
    store.worker = worker
    store.shared = True
    return store


def test_record_key_worker_bits(tmp_path):
    now = 1_700_000_000_123_000_000
    keys = {}
    for worker in (0, 1, 15):
        store = _store(tmp_path / str(worker), worker, lambda: now)
        keys[worker] = [store.next_key() for _ in range(1000)]
    for worker, generated in keys.items():
        sequences = [split_key(key)[1] for key in generated]
        assert {sequence >> 28 for sequence in sequences} == {worker}
        assert [sequence & 0x0FFFFFFF for sequence in sequences] == list(range(1, 1001))
        assert generated == sorted(generated)
    assert len(set(keys[0]) | set(keys[1]) | set(keys[15])) == 3000


def test_record_sequence_wrap_per_worker(tmp_path):
    now = 1_700_000_000_000_000_000
    store = _store(tmp_path, 5, lambda: now)
    store._sequence = (1 << 28) - 2
    generated = [store.next_key() for _ in range(3)]
    times = [split_key(key)[0] for key in generated]
    sequences = [split_key(key)[1] for key in generated]
    assert times == [now, now + 1_000_000, now + 1_000_000]
    assert [sequence >> 28 for sequence in sequences] == [5, 5, 5]
    assert [sequence & 0x0FFFFFFF for sequence in sequences] == [(1 << 28) - 1, 0, 1]
    assert generated == sorted(generated)


def test_shared_store_commits_lower_keys(tmp_path):
    """
    Two processes interleave keys; a shared store must accept a key lower
    than the greatest stored one, which LMDB's append mode refuses.
    """
    store = _store(tmp_path, 0, time.time_ns)
    store.open()
    try:
        high = store.append(header_fields(), b"{}")
        store._flush()
        store._last_ns = 0
        store.worker = 0
        store._sequence = 0
        store._clock_ns = lambda: 1_000_000_000
        low = store.append(header_fields(), b"{}")
        store._flush()
        keys = []
        high.addCallback(keys.append)
        low.addCallback(keys.append)
        assert len(keys) == 2
        assert keys[1] < keys[0]
        with store.env.begin() as txn:
            assert txn.stat(store.database(b"records"))["entries"] == 2
    finally:
        store.close()


def test_shared_store_opens_whole_map(tmp_path):
    store = _store(tmp_path, 1, time.time_ns)
    store.open()
    try:
        assert store.env.info()["map_size"] == 64 << 20
    finally:
        store.close()


def test_shared_store_adopts_grown_map(tmp_path):
    """
    Another process writes the environment with a larger map: the next
    commit here meets MDB_MAP_RESIZED, adopts the larger size and succeeds.
    """
    store = RecordStore(
        StoreOptions(path=str(tmp_path), map_size=1 << 20, max_map_size=2 << 20, durability="none", use_dictionaries=False),
        Clock(),
    )
    store.shared = True
    store.open()
    try:
        assert store.map_size == 2 << 20
        grow = (
            "import lmdb, os, sys\n"
            "env = lmdb.open(sys.argv[1], map_size=32 << 20, max_dbs=32, subdir=True)\n"
            "db = env.open_db(b'other')\n"
            "with env.begin(write=True) as txn:\n"
            "    for n in range(64):\n"
            "        txn.put(b'%04d' % n, os.urandom(64 * 1024), db=db)\n"
            "env.close()\n"
        )
        subprocess.run([sys.executable, "-c", grow, str(tmp_path)], check=True, timeout=60)
        appended = store.append(header_fields(), b'{"series":[]}')
        store._flush()
        keys = []
        appended.addCallback(keys.append)
        assert len(keys) == 1
        assert store.map_size == 32 << 20
    finally:
        store.close()


def test_non_training_worker_follows_dictionaries(tmp_path):
    import zstandard

    from reductrai.dictionaries import (
        CURRENT_PREFIX, DICTS_DB, META_DB, Dictionary, DictionaryManager, DictionaryOptions, encode_dictionary, id_key,
    )

    samples = [b'{"series":[{"metric":"m%d","points":[{"value":%d}],"tags":["env:prod"]}]}' % (n, n) for n in range(400)]
    trained = zstandard.train_dictionary(2048, samples).as_bytes()
    env = open_environment(str(tmp_path), 16 << 20)
    manager = DictionaryManager(DictionaryOptions(first_records=1), submit=lambda ops: None)
    manager.trains = False
    manager.load(env)
    assert manager.compressor_for("datadog/metrics") == (None, None)
    with env.begin(write=True) as txn:
        dicts, meta = env.open_db(DICTS_DB, txn=txn), env.open_db(META_DB, txn=txn)
        for number in (3, 4):
            value = encode_dictionary(Dictionary(number, "datadog/metrics", 1, len(samples), trained))
            txn.put(id_key(number), value, db=dicts)
        txn.put(CURRENT_PREFIX + b"datadog/metrics", id_key(4), db=meta)
    assert manager.refresh(env) == 1
    dictionary_id, compressor = manager.compressor_for("datadog/metrics")
    assert dictionary_id == 4
    frame = compressor.compress(samples[0])
    assert zstandard.ZstdDecompressor(dict_data=zstandard.ZstdCompressionDict(trained)).decompress(frame) == samples[0]
    # An older id, not current, is read on demand when a record needs it.
    assert 3 not in manager.data
    assert manager.data.get(3) == trained
    assert manager.data.get(99) is None
    assert manager.refresh(env) == 0
    # Not training: nothing is sampled.
    manager.observe("datadog/metrics", samples[1])
    assert manager.trainings == 0
    assert len(manager._streams["datadog/metrics"].samples) == 0
    env.close()


def test_entry_id_worker_bits():
    upstream = upstream_id(UPSTREAM)
    generated = set()
    for worker in range(16):
        for sequence in (0, 1, (1 << 28) - 1, 1 << 28, 0xFFFFFFFF):
            entry = make_entry_id(upstream, 42, sequence, worker)
            assert entry_worker(entry) == worker
            assert entry_time_ns(entry) == 42
            generated.add(entry)
    # Sequences equal in their low 28 bits collide within a worker only.
    assert len(generated) == 16 * 3


_KEY = os.urandom(32)


def _spool(store, clock, forwarder, worker: int, drains: bool, clock_ns) -> Spool:
    from reductrai.keybox import KeyBox

    options = SpoolOptions(live_grace=30.0, poll_interval=1.0, drain_rate=0)
    return Spool(store, forwarder, clock, options, KeyBox(_KEY), clock_ns=clock_ns, worker=worker, drains=drains)


def test_drain_skips_other_worker_young_entries(tmp_path):
    """
    Worker 0 does not send an entry of worker 1 until the live grace since
    its creation has passed; worker 1 itself never drains.
    """
    clock = Clock()
    wall = {"ns": 1_700_000_000_000_000_000}
    store = RecordStore(
        StoreOptions(path=str(tmp_path), map_size=16 << 20, max_map_size=64 << 20, durability="none", use_dictionaries=False),
        clock,
    )
    store.shared = True
    store.open()

    forwarder = ScriptedForwarder(lambda call: 202)
    child = _spool(store, clock, forwarder, worker=1, drains=False, clock_ns=lambda: wall["ns"])
    child.start()
    entry_id, appended = accept(child, store, 1)
    clock.advance(0)
    assert appended.called
    assert entry_worker(entry_id) == 1
    # Worker 1's live forward failed: the entry is left to the drain loop.
    child.settle(entry_id, 503)
    clock.advance(0)

    drainer = _spool(store, clock, forwarder, worker=0, drains=True, clock_ns=lambda: wall["ns"])
    drainer.start()
    for _ in range(5):
        wall["ns"] += 5_000_000_000
        clock.advance(5.0)
    assert forwarder.calls == []
    with store.env.begin() as txn:
        assert txn.get(entry_id, db=store.database(SPOOL_DB)) is not None

    wall["ns"] += 6_000_000_000
    clock.advance(6.0)
    clock.advance(1.0)
    assert [call.seq for call in forwarder.calls] == [1]
    clock.advance(0)
    with store.env.begin() as txn:
        assert txn.get(entry_id, db=store.database(SPOOL_DB)) is None
        assert txn.stat(store.database(b"spool_dead"))["entries"] == 0

    for spool in (child, drainer):
        spool.stop()
    store.close()


# Supervision


class _FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written: list[bytes] = []
        self.signals: list[str] = []

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.written.append(data)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class _SpawningClock(Clock):
    """
    A clock that records C{spawnProcess} calls instead of starting
    processes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[object, _FakeTransport, dict]] = []

    def spawnProcess(self, proto, executable, args, env=None, path=None, childFDs=None):
        transport = _FakeTransport(1000 + len(self.spawned))
        proto.makeConnection(transport)
        self.spawned.append((proto, transport, childFDs))
        return transport


def _end(proto, signal_number: Optional[int] = None) -> None:
    from twisted.internet.error import ProcessDone, ProcessTerminated
    from twisted.python.failure import Failure

    reason = ProcessTerminated(signal=signal_number) if signal_number else ProcessDone(0)
    proto.processEnded(Failure(reason))


def test_pool_restarts_with_doubling_backoff():
    from reductrai.worker import FIRST_BACKOFF, WorkerPool

    clock = _SpawningClock()
    ended = []
    pool = WorkerPool(clock, 3, lambda worker: {"worker": worker}, {3: 7}, stop_timeout=5.0, on_worker_ended=ended.append)
    pool.startService()
    assert [json.loads(t.written[0]) for _, t, _ in clock.spawned] == [{"worker": 1}, {"worker": 2}]
    assert all(fds[3] == 7 and fds[0] == "w" for _, _, fds in clock.spawned)
    assert pool.pids == {1: 1000, 2: 1001}
    first, _, _ = clock.spawned[0]
    _end(first, signal.SIGKILL)
    assert ended == [1]
    assert pool.pids == {2: 1001}
    clock.advance(FIRST_BACKOFF - 0.01)
    assert len(clock.spawned) == 2
    clock.advance(0.01)
    assert len(clock.spawned) == 3
    assert pool.pids == {1: 1002, 2: 1001}
    # It died again at once: the next delay doubles.
    _end(clock.spawned[2][0], signal.SIGKILL)
    clock.advance(2 * FIRST_BACKOFF - 0.01)
    assert len(clock.spawned) == 3
    clock.advance(0.01)
    assert len(clock.spawned) == 4


def test_pool_stop_terms_then_kills_by_pid():
    from reductrai.worker import WorkerPool

    clock = _SpawningClock()
    pool = WorkerPool(clock, 3, lambda worker: {"worker": worker}, {}, stop_timeout=5.0)
    pool.startService()
    stopped = []
    pool.stopService().addCallback(stopped.append)
    assert [t.signals for _, t, _ in clock.spawned] == [["TERM"], ["TERM"]]
    _end(clock.spawned[0][0])
    clock.advance(5.0)
    assert [t.signals for _, t, _ in clock.spawned] == [["TERM"], ["TERM", "KILL"]]
    assert stopped == []
    _end(clock.spawned[1][0], signal.SIGKILL)
    assert stopped == [None]
    # Not restarted once stopping.
    clock.advance(60.0)
    assert len(clock.spawned) == 2


# The real daemon


class DaemonProcess:
    """
    C{twistd -n reductrai --workers 2} in a subprocess, with its JSON log
    lines collected by a thread.
    """

    def __init__(self, data_dir: Path, *arguments: str, env: Optional[dict] = None) -> None:
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("REDUCTRAI_", "DD_", "DATADOG_"))}
        environment["REDUCTRAI_ADMIN_ALLOW_UNAUTHENTICATED_LOOPBACK"] = "true"
        environment.update(env or {})
        self.data_dir = data_dir
        self.process = subprocess.Popen(
            [
                *TWISTD, "-n", "--pidfile=", "reductrai", "--log-format", "json", "--workers", "2",
                "--data-dir", str(data_dir),
                "--listen", "ssl:0:interface=127.0.0.1",
                "--admin-listen", "tcp:0:interface=127.0.0.1",
                *arguments,
            ],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment,
        )
        self.events: list[dict] = []
        self.raw: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            text = line.decode("utf-8", "replace")
            with self._changed:
                self.raw.append(text)
                try:
                    self.events.append(json.loads(text))
                except ValueError:
                    pass
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[list[dict]], object], timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = predicate(self.events)
                if found:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None and not self._reader.is_alive():
                    raise AssertionError("timed out; daemon log:\n" + "".join(self.raw[-60:]))
                self._changed.wait(min(left, 0.5))

    def started(self, worker: int, after: int = 0) -> list[dict]:
        return [
            e for e in self.events[after:]
            if e.get("worker") == worker and "started in" in e.get("message", "")
        ]

    def worker_pids(self) -> list[int]:
        return [e["pid"] for e in self.events if e.get("message", "").startswith("Started worker")]

    def port(self, role: str) -> int:
        for event in self.events:
            found = re.search(rf"Listening for {role} traffic on .* \(port (\d+)\)", event.get("message", ""))
            if found and event.get("worker", 0) == 0:
                return int(found.group(1))
        raise LookupError(role)

    def wait_ready(self) -> None:
        self.wait_for(lambda events: self.started(0) and self.started(1))

    def stop(self, timeout: float = 40.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(5)
            self._reader.join(5)

    @property
    def certificate(self) -> str:
        return str(self.data_dir / "tls" / "dev-cert.pem")


def _body(marker: str) -> bytes:
    point = {"timestamp": int(time.time()), "value": 1.0}
    series = {"metric": marker, "type": 3, "points": [point], "resources": [{"name": "h1", "type": "host"}]}
    return json.dumps({"series": [series]}).encode()


def send_many(
    port: int, ca: str, markers: list[str], connections: int, timeout: float = 10.0,
    progress: Optional[Callable[[int], None]] = None,
) -> dict[str, int]:
    """
    Send one series request per marker over C{connections} keep-alive TLS
    connections.  A connection that breaks is opened again.

    @param progress: called with the number of responses so far after each.
    @return: the response status for each marker (0 when none came).
    """
    context = ssl.create_default_context(cafile=ca)
    results: dict[str, int] = {}
    lock = threading.Lock()

    def run(part: list[str]) -> None:
        connection = None
        for marker in part:
            status = 0
            try:
                if connection is None:
                    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=timeout)
                body = _body(marker)
                connection.request(
                    "POST", "/api/v2/series", body=body,
                    headers={"Content-Type": "application/json", "DD-API-KEY": API_KEY},
                )
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                if connection is not None:
                    connection.close()
                connection = None
            with lock:
                results[marker] = status
                done = len(results)
            if progress is not None:
                progress(done)
        if connection is not None:
            connection.close()

    with ThreadPoolExecutor(max_workers=connections) as pool:
        list(pool.map(run, [markers[i::connections] for i in range(connections)]))
    return results


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        text = response.read().decode()
        assert response.status == 200, text
    finally:
        connection.close()
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        found = re.match(r'^(\w+)(?:\{(.*)\})? (\S+)$', line)
        if found:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', found.group(2) or ""))
            samples[(found.group(1), labels)] = float(found.group(3))
    return samples


def metric_sum(samples, name: str, **labels: str) -> float:
    expected = set(labels.items())
    return sum(value for (found, have), value in samples.items() if found == name and expected <= have)


def stored_markers(data_dir: Path) -> tuple[dict[str, int], dict[str, int]]:
    """
    Read the store after the daemon stopped: how many records carry each
    marker, and the worker id in the key of each marker's record.
    """
    env = open_environment(str(data_dir / "store"), 0, readonly=True)
    try:
        view = StoreView(env)
        counts: dict[str, int] = {}
        workers: dict[str, int] = {}
        with view.begin() as txn:
            for entry in view.scan(txn):
                _, body = view.decode(entry)
                for marker in re.findall(rb"test\.workers\.\w+", body):
                    counts[marker.decode()] = counts.get(marker.decode(), 0) + 1
                    workers[marker.decode()] = split_key(entry.key)[1] >> 28
        return counts, workers
    finally:
        env.close()


def spool_entries(data_dir: Path) -> int:
    env = open_environment(str(data_dir / "store"), 0, readonly=True)
    try:
        db = env.open_db(SPOOL_DB, create=False)
        with env.begin() as txn:
            return txn.stat(db)["entries"]
    finally:
        env.close()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest_twisted.ensureDeferred
async def test_two_workers_store_once(tmp_path):
    daemon = DaemonProcess(tmp_path / "data", "--mode", "store-only")
    try:
        await threads.deferToThread(daemon.wait_ready)
        port, admin = daemon.port("ingest"), daemon.port("admin")
        markers = [f"test.workers.s{n:04d}" for n in range(300)]
        answered = await threads.deferToThread(send_many, port, daemon.certificate, markers, 24)
        samples = await threads.deferToThread(scrape, admin)
        pids = [daemon.process.pid] + daemon.worker_pids()
    finally:
        status = await threads.deferToThread(daemon.stop)
    assert status in (0, -signal.SIGTERM)
    assert sorted(answered.values()) == [202] * 300
    counts, workers = stored_markers(daemon.data_dir)
    assert counts == {marker: 1 for marker in markers}
    assert set(workers.values()) == {0, 1}
    per_worker = {w: metric_sum(samples, "reductrai_worker_requests_total", worker=str(w)) for w in (0, 1)}
    assert per_worker[0] > 0
    assert per_worker[1] > 0
    assert per_worker[0] + per_worker[1] == 300
    assert metric_sum(samples, "reductrai_requests_total", status="202") == 300
    assert metric_sum(samples, "reductrai_stored_records_total") == 300
    assert not any(alive(pid) for pid in pids)
    assert {e.get("worker") for e in daemon.events if "level" in e} >= {0, 1}
    assert os.stat(daemon.data_dir / "metrics").st_mode & 0o777 == 0o700


@pytest_twisted.ensureDeferred
async def test_killed_worker_restarts_losing_nothing(tmp_path):
    daemon = DaemonProcess(tmp_path / "data", "--mode", "store-only")
    try:
        await threads.deferToThread(daemon.wait_ready)
        port, admin = daemon.port("ingest"), daemon.port("admin")
        first = [f"test.workers.a{n:04d}" for n in range(200)]
        second = [f"test.workers.b{n:04d}" for n in range(150)]
        (victim,) = daemon.worker_pids()
        killed = []

        def kill_midway(done: int) -> None:
            if done >= 60 and not killed:
                killed.append(done)
                os.kill(victim, signal.SIGKILL)

        answered = await threads.deferToThread(send_many, port, daemon.certificate, first, 12, 10.0, kill_midway)
        await threads.deferToThread(daemon.wait_for, lambda events: daemon.started(1)[1:], 30.0)
        answered.update(await threads.deferToThread(send_many, port, daemon.certificate, second, 12))
        samples = await threads.deferToThread(scrape, admin)
        pids = [daemon.process.pid] + daemon.worker_pids()
    finally:
        await threads.deferToThread(daemon.stop)
    assert killed
    assert any("Worker 1 ended (signal 9)" in e.get("message", "") for e in daemon.events)
    assert len(set(pids)) == 3
    counts, workers = stored_markers(daemon.data_dir)
    ok = [marker for marker, status in answered.items() if status == 202]
    assert [m for m in ok if counts.get(m) != 1] == []
    assert all(count == 1 for count in counts.values())
    assert all(answered[marker] == 202 for marker in second)
    # The restarted worker 1 served part of the second batch.
    assert {workers[marker] for marker in second} == {0, 1}
    assert metric_sum(samples, "reductrai_requests_total", status="202") >= len(ok)
    assert not any(alive(pid) for pid in pids)


@pytest_twisted.ensureDeferred
async def test_two_workers_forward_once(tmp_path):
    upstream = Upstream()
    daemon = DaemonProcess(tmp_path / "data", "--mode", "forward", "--forward-to", upstream.url)
    try:
        await threads.deferToThread(daemon.wait_ready)
        port, admin = daemon.port("ingest"), daemon.port("admin")
        markers = [f"test.workers.f{n:04d}" for n in range(300)]
        answered = await threads.deferToThread(send_many, port, daemon.certificate, markers, 24)
        samples = await threads.deferToThread(scrape, admin)
        pids = [daemon.process.pid] + daemon.worker_pids()
    finally:
        status = await threads.deferToThread(daemon.stop)
        await upstream.stop()
    assert status in (0, -signal.SIGTERM)
    assert sorted(answered.values()) == [202] * 300
    delivered: dict[str, int] = {}
    for received in upstream.received:
        for marker in re.findall(rb"test\.workers\.\w+", received.body):
            delivered[marker.decode()] = delivered.get(marker.decode(), 0) + 1
    assert delivered == {marker: 1 for marker in markers}
    counts, workers = stored_markers(daemon.data_dir)
    assert counts == {marker: 1 for marker in markers}
    assert set(workers.values()) == {0, 1}
    assert spool_entries(daemon.data_dir) == 0
    assert metric_sum(samples, "reductrai_upstream_requests_total") == 300
    assert metric_sum(samples, "reductrai_worker_requests_total", worker="1") > 0
    assert not any(alive(pid) for pid in pids)
