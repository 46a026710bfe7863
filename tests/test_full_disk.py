"""
Nothing accepted is ever lost when the disk or the store map is full.

Two ways of running out of space are tested end to end:

  - the LMDB map reaches C{storage.max_map_size} (a few MiB) while the
    upstream is down, so every accepted request sits in the spool;
  - a real tmpfs of a few MiB fills up under a C{twistd} daemon whose map
    is larger than the filesystem, so LMDB's write of new pages fails
    with ENOSPC.

In both, every request acknowledged with 2xx must be stored intact, requests past
the limit must get 503 with C{Retry-After}, and the daemon must keep
serving.  In the first, the spool must then deliver every accepted
request once the upstream is back, and new requests must be accepted
again without a restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads

from tests.support import Upstream, read_ndjson, run_inspect, send_raw, start_daemon
from tests.test_twistd import stop, twistd, wait_for_ports
from tests.test_full_disk_support import (
    API_KEY,
    Exchange,
    ReusableUpstream,
    http_get,
    log_body,
    marker_of,
)

MiB = 1024 * 1024

#: Requests sent at once while filling the store.
CONCURRENCY = 4
#: Non-2xx responses after which the filling phase stops.
REJECTIONS_TO_STOP = 6


async def _send(port: int, number: int, rng: random.Random, size: int) -> Exchange:
    body = log_body(number, rng, size)
    status, headers, answer = await send_raw(
        port, "POST", "/api/v2/logs",
        [("Host", "x"), ("Content-Type", "application/json"), ("DD-API-KEY", API_KEY)], body,
    )
    return Exchange(number, body, status, {name.lower(): value for name, value in headers}, answer)


async def _fill(port: int, rng: random.Random, size: int, limit: int, first: int = 0) -> list[Exchange]:
    """
    Send requests of about C{size} bytes, C{CONCURRENCY} at a time, until
    C{REJECTIONS_TO_STOP} were not accepted or C{limit} were sent.
    """
    exchanges: list[Exchange] = []
    rejected = 0
    number = first
    while number < first + limit and rejected < REJECTIONS_TO_STOP:
        batch = await defer.gatherResults(
            [defer.ensureDeferred(_send(port, number + i, rng, size)) for i in range(CONCURRENCY)]
        )
        number += CONCURRENCY
        exchanges.extend(batch)
        rejected += sum(1 for exchange in batch if not 200 <= exchange.status < 300)
    return exchanges


async def _assert_stored_intact(data_dir, accepted: list[Exchange]) -> dict:
    """
    Read the store with C{reductrai-inspect} in another process: every
    accepted request is there once, with its body, and C{verify} finds no
    corrupt record.

    @return: the exported records by request number.
    """
    exported = read_ndjson(await run_inspect(data_dir, "export"))
    by_number: dict[int, list[dict]] = {}
    for record in exported:
        by_number.setdefault(int(record["body"][0]["ddtags"][2:]), []).append(record)
    for exchange in accepted:
        records = by_number.get(exchange.number, [])
        assert len(records) == 1, f"request {exchange.number} is stored {len(records)} times"
        assert records[0]["body"] == json.loads(exchange.body)
        assert records[0]["raw_bytes"] == len(exchange.body)

    await run_inspect(data_dir, "verify")
    return by_number


def _assert_bytes_identical(service, accepted: list[Exchange]) -> None:
    """
    Decode every record in process, byte for byte against what was sent.
    """
    sent = {hashlib.sha256(exchange.body).digest(): exchange.number for exchange in accepted}
    found: set[int] = set()
    view = service.store.view()
    with view.begin() as txn:
        for entry in view.scan(txn):
            _, body = view.decode(entry)
            number = sent.get(hashlib.sha256(body).digest())
            if number is not None:
                found.add(number)
    missing = sorted(set(sent.values()) - found)
    assert not missing, f"records not byte-identical to what was sent: {missing}"


@pytest_twisted.ensureDeferred
async def test_full_map_rejects_then_recovers(tmp_path):
    """
    With the upstream down, requests are accepted (spooled) until the map
    reaches C{storage.max_map_size}; after that requests are rejected.
    Every accepted request is stored intact and C{/health} still responds.
    Once the upstream is back on the same port the spool delivers every
    accepted request and deletes its entries, which frees the pages its
    body copies held, so new requests are accepted again without a
    restart and without freeing records.  Rejections are 503 with
    C{Retry-After}.
    """
    upstream = Upstream()
    port = upstream.port.getHost().port
    await upstream.stop()
    data_dir = tmp_path / "data"
    daemon = start_daemon(
        data_dir,
        proxy__mode="forward",
        proxy__forward_to=upstream.url,
        storage__map_size=2 * MiB,
        storage__max_map_size=4 * MiB,
        storage__compact_after=1e6,
        storage__durability="none",
        spool__backoff_base=0.05,
        spool__backoff_cap=0.5,
        spool__live_grace=1.0,
    )
    rng = random.Random(20240611)
    returned = None
    try:
        exchanges = await _fill(daemon.http_port, rng, 24 * 1024, limit=400)
        accepted = [exchange for exchange in exchanges if 200 <= exchange.status < 300]
        rejected = [exchange for exchange in exchanges if not 200 <= exchange.status < 300]
        # A 4 MiB map fits about 100 requests of 24 KiB (record plus spool
        # copy, 97 in practice), so 400 requests always fill it.
        assert rejected, "the map never filled"
        assert len(accepted) >= 10
        assert all(exchange.headers.get("x-reductrai-queued") == "true" for exchange in accepted)
        status = json.loads((await http_get(daemon.admin_port, "/health"))[1])
        assert status["store"]["map_size"] == 4 * MiB
        assert status["spool"]["depth"] == len(accepted)

        await _assert_stored_intact(data_dir, accepted)
        _assert_bytes_identical(daemon.service, accepted)
        code, _ = await http_get(daemon.admin_port, "/health")
        assert code == 200

        returned = ReusableUpstream(port)
        expected = {exchange.number for exchange in accepted}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            delivered = [marker_of(received.body) for received in returned.received]
            depth = json.loads((await http_get(daemon.admin_port, "/health"))[1])["spool"]["depth"]
            if expected <= set(delivered) and depth == 0:
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        delivered = [marker_of(received.body) for received in returned.received]
        assert sorted(expected - set(delivered)) == [], "accepted requests never delivered"
        assert depth == 0
        duplicates = {number: delivered.count(number) for number in set(delivered) if delivered.count(number) > 1}
        print(f"\naccepted {len(accepted)}, rejected {len(rejected)}, delivered {len(delivered)}, "
              f"duplicates {duplicates}, drained in {30 - (deadline - time.monotonic()):.1f} s")
        by_body = {hashlib.sha256(exchange.body).digest() for exchange in accepted}
        assert all(hashlib.sha256(received.body).digest() in by_body for received in returned.received)
        assert {received.header("dd-api-key") for received in returned.received} == {API_KEY.encode()}

        # Records stay; the spool's copies are gone, so there is room again.
        again = [await _send(daemon.http_port, 10000 + i, rng, 24 * 1024) for i in range(10)]
        assert [exchange.status for exchange in again] == [202] * 10
        await _assert_stored_intact(data_dir, accepted + again)
        code, _ = await http_get(daemon.admin_port, "/health")
        assert code == 200

        # Checked last so that a wrong status does not hide the other checks.
        assert [(exchange.status, "retry-after" in exchange.headers) for exchange in rejected] == (
            [(503, True)] * len(rejected)
        ), "a request rejected because the map is full must get 503 with Retry-After"
    finally:
        await daemon.stop()
        if returned is not None:
            await returned.stop()


def _mount_tmpfs(directory, size: str) -> None:
    """
    Mount a tmpfs of C{size} on C{directory}, or skip the test saying why.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    directory.mkdir(parents=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
        capture_output=True, timeout=30, check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {result.stderr.decode().strip()}")


def _unmount(directory) -> None:
    subprocess.run(["umount", "-l", str(directory)], capture_output=True, timeout=30, check=False)


@pytest_twisted.ensureDeferred
async def test_full_tmpfs_rejects_and_keeps_records(tmp_path):
    """
    A C{twistd} daemon (store-only) keeps its data on an 8 MiB tmpfs with
    a map of 64 MiB, so the filesystem fills before the map does and the
    commit that writes new pages fails.  LMDB reports that as EIO
    (C{mdb_txn_commit: Input/output error}, observed on tmpfs), not as
    ENOSPC or C{MDB_MAP_FULL}.  Requests past that point
    get 503 with C{Retry-After}, every accepted record stays intact,
    C{/health} answers, and once the operator frees disk space (deletes a
    ballast file) requests are accepted again without a restart.
    """
    mount = tmp_path / "small"
    _mount_tmpfs(mount, "8m")
    process = None
    lines: list[str] = []
    log = ""
    try:
        data_dir = mount / "data"
        # A ballast file takes half of the filesystem.  Deleting it later
        # frees space as an operator would.
        ballast = mount / "ballast"
        ballast.write_bytes(b"\0" * (4 * MiB))
        process = twistd(
            "--mode", "store-only", "--data-dir", str(data_dir),
            "--listen", "tcp:0:interface=127.0.0.1", "--admin-listen", "tcp:0:interface=127.0.0.1",
            env={
                "REDUCTRAI_STORAGE_MAP_SIZE": str(64 * MiB),
                "REDUCTRAI_STORAGE_MAX_MAP_SIZE": str(64 * MiB),
                "REDUCTRAI_STORAGE_COMPACT_AFTER": "1000000",
                "REDUCTRAI_ADMIN_ALLOW_UNAUTHENTICATED_LOOPBACK": "true",
            },
        )
        (http_port, admin_port), lines = await threads.deferToThread(wait_for_ports, process, 2)
        rng = random.Random(8)
        exchanges = await _fill(http_port, rng, 32 * 1024, limit=400)
        accepted = [exchange for exchange in exchanges if 200 <= exchange.status < 300]
        rejected = [exchange for exchange in exchanges if not 200 <= exchange.status < 300]
        free = shutil.disk_usage(mount).free
        print(f"\naccepted {len(accepted)}, rejected {len(rejected)} ({sorted({e.status for e in rejected})}), "
              f"free bytes {free}, data file {(data_dir / 'store' / 'data.mdb').stat().st_size}")
        assert rejected, "the filesystem never filled"
        assert len(accepted) >= 10
        # The map (64 MiB) is far from full, so the rejections come from the disk.
        assert (data_dir / "store" / "data.mdb").stat().st_size < 8 * MiB
        code, body = await http_get(admin_port, "/health")
        assert code == 200, body

        await _assert_stored_intact(data_dir, accepted)

        ballast.unlink()
        again = [await _send(http_port, 10000 + i, rng, 32 * 1024) for i in range(10)]
        assert [exchange.status for exchange in again] == [202] * 10
        await _assert_stored_intact(data_dir, accepted + again)

        assert [(exchange.status, "retry-after" in exchange.headers) for exchange in rejected] == (
            [(503, True)] * len(rejected)
        ), "a request rejected because the disk is full must get 503 with Retry-After"
    finally:
        try:
            if process is not None and process.poll() is None:
                log = await threads.deferToThread(stop, process, lines)
        finally:
            _unmount(mount)
    # A failed commit is logged by the store and the resource.  No Deferred
    # may fail without an errback attached.
    assert "Unhandled error in Deferred" not in log, log[-3000:]
