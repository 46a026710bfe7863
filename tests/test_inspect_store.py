"""
The maintenance commands of reductrai-inspect on a store a live daemon
could hold open: blocks, dicts, readers, backup (encrypted), restore,
purge and compact.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads

from reductrai.compactor import Compactor, CompactorOptions
from reductrai.dictionaries import DictionaryOptions
from reductrai.store import RecordStore, StoreOptions


def fields(kind: str) -> dict:
    return {"vendor": "datadog", "kind": kind, "route": "r", "method": "POST", "path": "/p", "query": "",
            "content_type": "application/json", "content_encoding": None, "wire_size": 1, "headers": []}


def inspect_command(data_dir: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reductrai.inspect", "--data-dir", str(data_dir), *arguments],
                          capture_output=True, timeout=120)


async def filled_store(data_dir: Path) -> tuple[RecordStore, list[bytes]]:
    options = StoreOptions(path=str(data_dir / "store"), durability="none",
                           dictionaries=DictionaryOptions(first_records=30, size=4096))
    store = RecordStore(options, reactor)
    store.open()
    keys = []
    for n in range(120):
        body = json.dumps({"series": [{"metric": "cpu", "points": [[1796000000 + n, n * 0.5]], "host": f"h{n % 3}"}]})
        keys.append(await store.append(fields("metrics" if n % 2 else "logs"), body.encode()))
    return store, keys


@pytest_twisted.ensureDeferred
async def test_commands_on_live_store(tmp_path: Path):
    store, keys = await filled_store(tmp_path)
    try:
        for _ in range(100):
            if store.dictionaries.trainings:
                break
            await threads.deferToThread(lambda: None)
        await Compactor(store, reactor, CompactorOptions(min_age=0)).compact_all()
        later = []
        for n in range(5):
            # Keys carry whole milliseconds: space these so that purge can split them.
            await task.deferLater(reactor, 0.003, lambda: None)
            later.append(await store.append(fields("logs"), b'{"later":%d}' % n))
        store.env.sync(True)

        blocks = json.loads((await threads.deferToThread(inspect_command, tmp_path, "blocks", "--json")).stdout)
        assert sum(b["records"] for b in blocks) == len(keys)
        dicts_run = await threads.deferToThread(inspect_command, tmp_path, "dicts", "--json")
        assert dicts_run.returncode == 0, dicts_run.stderr
        dicts = json.loads(dicts_run.stdout)
        assert len(dicts) == store.status()["dictionaries"]
        readers = await threads.deferToThread(inspect_command, tmp_path, "readers", "--json")
        assert readers.returncode == 0
        stat = json.loads((await threads.deferToThread(inspect_command, tmp_path, "stat", "--json")).stdout)
        assert stat["records"] == len(keys) + len(later)
        show = await threads.deferToThread(
            inspect_command, tmp_path, "show", "--raw",
            f"{int.from_bytes(keys[7][:8], 'big')}-{int.from_bytes(keys[7][8:], 'big')}",
        )
        assert json.loads(show.stdout)["series"][0]["points"][0][1] == 7 * 0.5

        passphrase = tmp_path / "passphrase"
        passphrase.write_text("a long passphrase\n")
        backup = await threads.deferToThread(
            inspect_command, tmp_path, "backup", str(tmp_path / "copy.bak"), "--passphrase-file", str(passphrase)
        )
        assert backup.returncode == 0, backup.stderr
    finally:
        await store.close()

    restored = tmp_path / "restored"
    result = inspect_command(restored, "restore", str(tmp_path / "copy.bak"), "--passphrase-file", str(passphrase))
    assert result.returncode == 0, result.stderr
    stat = json.loads(inspect_command(restored, "stat", "--json").stdout)
    assert stat["records"] == len(keys) + len(later)
    assert inspect_command(restored, "verify").returncode == 0

    before_text = f"{int.from_bytes(later[2][:8], 'big') / 1e9:.6f}"
    before_ns = int(float(before_text) * 1_000_000_000)
    purge = inspect_command(restored, "purge", "--before", before_text)
    assert purge.returncode == 0, purge.stderr
    assert json.loads(purge.stdout)["blocks"] == len(blocks)
    listing = [json.loads(line)["key"] for line in inspect_command(restored, "ls", "--json").stdout.splitlines()]
    expected = [f"{int.from_bytes(k[:8], 'big')}-{int.from_bytes(k[8:], 'big')}"
                for k in keys + later if int.from_bytes(k[:8], "big") >= before_ns]
    assert listing == expected
    assert len(expected) in (2, 3)
    compact = json.loads(inspect_command(restored, "compact").stdout)
    assert compact["after_bytes"] <= compact["before_bytes"]


@pytest.mark.skipif(shutil.which("mdb_stat") is None, reason="lmdb-utils (mdb_stat, mdb_dump) is not installed")
@pytest_twisted.ensureDeferred
async def test_stock_tools_read_the_store(tmp_path: Path):
    store, _ = await filled_store(tmp_path)
    try:
        await Compactor(store, reactor, CompactorOptions(min_age=0)).compact_all()
        store.env.sync(True)
        stat = subprocess.run(["mdb_stat", "-a", str(tmp_path / "store")], capture_output=True, timeout=60)
        assert stat.returncode == 0
        assert b"blocks" in stat.stdout
        dump = subprocess.run(["mdb_dump", "-s", "blocks", str(tmp_path / "store")], capture_output=True, timeout=60)
        assert dump.returncode == 0
    finally:
        await store.close()
