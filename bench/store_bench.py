"""
Store benchmark: ingest MB/s, compaction MB/s and the latency of a 1-hour
log query, through RecordStore, Compactor and QueryEngine.

Run: /work/venv/bin/python bench/store_bench.py --items N

Synthetic Datadog logs (JSON batches of 100 lines with varying services,
hosts, levels, trace ids and values), spread evenly over 24 hours of
arrival time by a fake clock, appended with their parsed items (so the
indexes are written).  A 1-hour window is queried by service (indexed)
and by substring (scan) while every record is hot, then everything is
packed and the same queries run twice (the second time with the blocks
cached).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer, task  # noqa: E402

from reductrai.compactor import Compactor, CompactorOptions  # noqa: E402
from reductrai.formats.datadog import parse_logs_v2  # noqa: E402
from reductrai.formats.items import PayloadContext  # noqa: E402
from reductrai.query import Params, QueryEngine  # noqa: E402
from reductrai.store import RecordStore, StoreOptions  # noqa: E402

HOUR = 3600 * 10**9
BASE = 1_796_000_000 * 10**9


def batch(rng: random.Random, now_ms: int, size: int) -> bytes:
    lines = []
    for i in range(size):
        service = f"svc-{rng.randrange(20)}"
        lines.append({
            "message": f"request {rng.randrange(10**9)} took {rng.random() * 100:.3f} ms status={rng.choice([200, 200, 200, 404, 500])}",
            "ddsource": "python", "service": service, "hostname": f"host-{rng.randrange(50)}",
            "status": rng.choice(["info", "info", "warn", "error"]), "ddtags": "env:prod",
            "dd.trace_id": str(rng.getrandbits(63)), "timestamp": now_ms + i,
        })
    return json.dumps(lines, separators=(",", ":")).encode()


async def run(reactor, items: int, per_request: int, map_size: int) -> dict:
    directory = tempfile.mkdtemp(prefix="store-bench-")
    clock = {"now": BASE}
    store = RecordStore(StoreOptions(path=directory + "/store", durability="none", map_size=map_size,
                                     max_map_size=map_size), reactor,
                        clock_ns=lambda: clock["now"])
    store.open()
    rng = random.Random(1)
    requests = items // per_request
    step = 24 * HOUR // requests
    context = PayloadContext(path="/api/v2/logs", content_type="application/json")
    header = {"vendor": "datadog", "kind": "logs", "route": "logs_v2", "method": "POST", "path": "/api/v2/logs",
              "query": "", "content_type": "application/json", "content_encoding": None, "wire_size": 0, "headers": []}
    raw = 0
    ingest = 0.0
    # Bodies and their items are made in chunks outside the timed part, so
    # that memory stays bounded at any item count.
    for chunk in range(0, requests, 1000):
        bodies = []
        for n in range(chunk, min(chunk + 1000, requests)):
            body = batch(rng, (BASE + n * step) // 10**6, per_request)
            bodies.append((n, body, parse_logs_v2(body, context).items))
        raw += sum(len(body) for _, body, _ in bodies)
        started = time.perf_counter()
        pending = []
        for n, body, parsed in bodies:
            clock["now"] = BASE + n * step
            pending.append(store.append(header, body, items=parsed))
            if len(pending) >= 200:
                await defer.gatherResults(pending)
                pending = []
        await defer.gatherResults(pending)
        ingest += time.perf_counter() - started
    engine = QueryEngine(store.view)
    window = {b"from": [str((BASE + 12 * HOUR) / 1e9).encode()], b"to": [str((BASE + 13 * HOUR) / 1e9).encode()],
              b"limit": [b"10000"]}
    timings = {}

    def query(state: str) -> None:
        for name, extra in (("service (index)", {b"service": [b"svc-3"]}), ("substring (scan)", {b"q": [b"status=500"]})):
            started = time.perf_counter()
            document = engine.logs(Params({**window, **extra}))
            timings[f"{name}, {state}"] = (time.perf_counter() - started, len(document["items"]), document["examined"])

    query("hot")
    clock["now"] = BASE + 25 * HOUR
    compactor = Compactor(store, reactor, CompactorOptions(min_age=0, level=19))
    started = time.perf_counter()
    await compactor.compact_all()
    compaction = time.perf_counter() - started
    status = store.status()
    query("packed")
    query("packed, blocks cached")
    await store.close()
    shutil.rmtree(directory, ignore_errors=True)
    return {"items": requests * per_request, "requests": requests, "raw": raw, "ingest": ingest,
            "compaction": compaction, "status": status, "queries": timings}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--per-request", type=int, default=100)
    parser.add_argument("--map-gib", type=int, default=4, help="LMDB map size (10 million items need about 8)")
    args = parser.parse_args()

    def go(reactor):
        d = defer.ensureDeferred(run(reactor, args.items, args.per_request, args.map_gib << 30))
        d.addCallback(lambda result: print(json.dumps(result, default=str, indent=1)))
        return d

    task.react(go)


if __name__ == "__main__":
    main()
