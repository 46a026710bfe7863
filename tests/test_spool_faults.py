"""
End-to-end fault tests: a real spool, store and forwarder against a
fault-injecting upstream on 127.0.0.1, on the real reactor.  Each test
bounds its time and states the counts it expects.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads

from reductrai.forward import Forwarder
from reductrai.keybox import KeyBox
from reductrai.spool import Spool, SpoolOptions
from reductrai.spool.entries import BODY_DB, DEAD_DB, SPOOL_DB

from tests.spool_support import FaultUpstream, accept
from reductrai.store import RecordStore, StoreOptions
import attrs


def real_store(path) -> RecordStore:
    extra = {"use_dictionaries": False} if "use_dictionaries" in attrs.fields_dict(StoreOptions) else {}
    store = RecordStore(StoreOptions(path=str(path), map_size=64 << 20, durability="none", **extra), reactor)
    store.open()
    return store


def count(store, db) -> int:
    handle = store.database(db)
    with store.env.begin() as txn:
        return txn.stat(handle)["entries"]


async def wait_until(predicate, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await task.deferLater(reactor, step, lambda: None)
    return predicate()


class Harness:
    def __init__(self, tmp_path, **options) -> None:
        self.tmp_path = tmp_path
        self.upstream = FaultUpstream()
        self.forwarder = Forwarder(reactor, max_in_flight=64, connect_timeout=1.0, timeout=1.0)
        self.keybox = KeyBox.load(str(tmp_path))
        defaults = dict(backoff_base=0.02, backoff_cap=0.2, circuit_failures=3, live_grace=30.0,
                        drain_rate=0, max_concurrency=8, poll_interval=0.2, stop_timeout=2.0)
        defaults.update(options)
        self.options = SpoolOptions(**defaults)
        self.store = real_store(tmp_path / "store")
        self.spool = Spool(self.store, self.forwarder, reactor, self.options, self.keybox)
        self.spool.start()

    async def accept_failed(self, count: int, start: int = 0) -> list[bytes]:
        """
        Accept C{count} requests whose live forward failed (the upstream
        was unreachable): committed, then settled with no status.
        """
        ids, waiting = [], []
        for number in range(start, start + count):
            entry_id, d = accept(self.spool, self.store, number, base=self.upstream.url)
            ids.append(entry_id)
            waiting.append(d)
        for d in waiting:
            await d
        for entry_id in ids:
            self.spool.settle(entry_id, None)
        return ids

    async def close(self) -> None:
        await self.spool.stop()
        await self.store.close()
        await self.forwarder.close()
        await self.upstream.stop()


def run_spool_cli(data_dir, *arguments: str):
    """
    Run the spool command in its own process, as an operator would.
    """

    def run():
        result = subprocess.run(
            [sys.executable, "-m", "reductrai.inspect_spool", "--data-dir", str(data_dir), "spool", *arguments],
            capture_output=True, timeout=60, check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode()

    return threads.deferToThread(run)


def duplicates(seqs: list[int]) -> int:
    return sum(n - 1 for n in collections.Counter(seqs).values() if n > 1)


@pytest_twisted.ensureDeferred
async def test_outage_then_recovery_delivers_everything(tmp_path):
    harness = Harness(tmp_path)
    await harness.upstream.down()
    total = 200
    await harness.accept_failed(total)
    await task.deferLater(reactor, 0.5, lambda: None)
    assert harness.upstream.resource.received == []  # the port is closed
    assert harness.spool.status()["upstreams"][harness.upstream.url]["circuit"] in ("open", "half-open")
    harness.upstream.up()
    assert await wait_until(lambda: count(harness.store, SPOOL_DB) == 0, 20.0)
    delivered = harness.upstream.delivered_seqs()
    assert sorted(set(delivered)) == list(range(total))
    # Reported, not asserted to be zero: at-least-once allows duplicates.
    print(f"outage: {total} accepted, {len(delivered)} delivered, {duplicates(delivered)} duplicates")
    assert harness.spool.status()["upstreams"][harness.upstream.url]["circuit"] == "closed"
    await harness.close()


@pytest_twisted.ensureDeferred
async def test_500_storm_then_recovery(tmp_path):
    harness = Harness(tmp_path, max_concurrency=4)
    harness.upstream.set_mode("500")
    total = 50
    await harness.accept_failed(total)
    assert await wait_until(lambda: len(harness.upstream.resource.received) >= 5, 5.0)
    harness.upstream.set_mode("ok")
    assert await wait_until(lambda: count(harness.store, SPOOL_DB) == 0, 20.0)
    assert sorted(set(harness.upstream.delivered_seqs())) == list(range(total))
    assert count(harness.store, DEAD_DB) == 0
    assert harness.spool.counters.retries >= 5
    await harness.close()


@pytest_twisted.ensureDeferred
async def test_429_retry_after_is_honoured(tmp_path):
    harness = Harness(tmp_path, max_concurrency=1, circuit_failures=100)
    harness.upstream.set_mode("429")
    harness.upstream.resource.retry_after = b"1"
    await harness.accept_failed(3)
    assert await wait_until(lambda: len(harness.upstream.resource.answered) >= 1, 5.0)
    answered_at = harness.upstream.resource.answered[0][0]
    harness.upstream.set_mode("ok")
    assert await wait_until(lambda: count(harness.store, SPOOL_DB) == 0, 10.0)
    received = harness.upstream.resource.received
    # Nothing was sent during the second that Retry-After asked for.
    assert received[1][0] - answered_at >= 0.95
    assert harness.upstream.delivered_seqs() == [0, 1, 2]
    await harness.close()


@pytest_twisted.ensureDeferred
async def test_403_becomes_dead_letters_and_replays_from_the_cli(tmp_path):
    harness = Harness(tmp_path)
    harness.upstream.set_mode("403")
    total = 10
    await harness.accept_failed(total)
    assert await wait_until(lambda: count(harness.store, DEAD_DB) == total, 10.0)
    await task.deferLater(reactor, 0.3, lambda: None)
    assert len(harness.upstream.resource.received) == total  # not retried
    assert count(harness.store, SPOOL_DB) == 0 and count(harness.store, BODY_DB) == 0
    assert harness.spool.counters.dead_lettered == total

    harness.upstream.set_mode("ok")
    listed = await run_spool_cli(tmp_path, "list", "--which", "dead", "--json")
    rows = [json.loads(line) for line in listed.splitlines()]
    assert len(rows) == total and {row["status"] for row in rows} == {403}
    assert all(row["credentials"] == "none" for row in rows)
    replayed = json.loads(await run_spool_cli(tmp_path, "replay", "--all", "--json"))
    assert len(replayed["replayed"]) == total
    assert await wait_until(lambda: count(harness.store, SPOOL_DB) == 0 and len(harness.upstream.delivered_seqs()) == total, 10.0)
    assert sorted(harness.upstream.delivered_seqs()) == list(range(total))
    # Dead letters keep no credentials, so the replay carries none.
    last = harness.upstream.resource.received[-1][2]
    assert last.getRawHeaders(b"dd-api-key") is None and last.getRawHeaders(b"x-seq") is not None
    await harness.close()


@pytest_twisted.ensureDeferred
async def test_reset_mid_body_and_refused_connections_are_retried(tmp_path):
    harness = Harness(tmp_path, max_concurrency=2)
    harness.upstream.set_mode("reset")
    await harness.accept_failed(10)
    assert await wait_until(lambda: len(harness.upstream.resource.received) >= 3, 5.0)
    await harness.upstream.refuse()
    await task.deferLater(reactor, 0.5, lambda: None)
    harness.upstream.set_mode("ok")
    await harness.upstream.restore()
    assert await wait_until(lambda: count(harness.store, SPOOL_DB) == 0, 20.0)
    assert sorted(set(harness.upstream.delivered_seqs())) == list(range(10))
    await harness.close()


@pytest_twisted.ensureDeferred
async def test_slow_upstream_times_out_and_is_retried(tmp_path):
    harness = Harness(tmp_path, max_concurrency=2)
    harness.upstream.set_mode("slow")
    harness.upstream.resource.delay = 3.0  # longer than the 1 s forward timeout
    await harness.accept_failed(5)
    assert await wait_until(lambda: len(harness.upstream.resource.received) >= 2, 5.0)
    harness.upstream.set_mode("ok")
    assert await wait_until(lambda: count(harness.store, SPOOL_DB) == 0, 20.0)
    assert set(range(5)) <= set(harness.upstream.delivered_seqs())
    await harness.close()


@pytest_twisted.ensureDeferred
async def test_restart_drains_what_the_previous_process_left(tmp_path):
    harness = Harness(tmp_path, live_grace=600.0)
    await harness.upstream.down()
    ids = []
    for number in range(30):
        entry_id, d = accept(harness.spool, harness.store, number, base=harness.upstream.url)
        ids.append(d)
    for d in ids:
        await d
    # The live forwards never report: the process stops here.
    await harness.spool.stop()
    await harness.store.close()
    harness.upstream.up()

    store = real_store(tmp_path / "store")
    spool = Spool(store, harness.forwarder, reactor, harness.options, KeyBox.load(str(tmp_path)))
    spool.start()
    assert await wait_until(lambda: count(store, SPOOL_DB) == 0, 10.0)
    assert sorted(harness.upstream.delivered_seqs()) == list(range(30))
    await spool.stop()
    await store.close()
    await harness.forwarder.close()
    await harness.upstream.stop()
