"""
Drain a large spool into a fast local upstream and report the peak memory
of the draining process.

    /work/venv/bin/python bench/spool_drain.py [--entries 100000] [--body-bytes 600]

Three processes, all on 127.0.0.1: one fills a spool in a temporary
directory (so that filling does not count against the drainer's memory),
one is the upstream (answers 202 to everything), and this one drains.  The
run is bounded by --timeout and removes its directory afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time


def rss_now_kib(field: str = "VmRSS") -> int:
    """
    Read one memory figure of this process from /proc/self/status, in KiB:
    VmRSS (all resident), RssAnon (heap and stacks) or RssFile (mapped
    files, the LMDB pages read included).
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def fill(data_dir: str, entries: int, body_bytes: int) -> None:
    from twisted.internet import task
    from twisted.web.http_headers import Headers

    from reductrai.keybox import KeyBox
    from reductrai.spool import Spool, SpoolOptions
    from reductrai.store import RecordStore, StoreOptions

    clock = task.Clock()
    store = RecordStore(StoreOptions(path=os.path.join(data_dir, "store"), durability="none"), clock)
    store.open()
    spool = Spool(store, None, clock, SpoolOptions(max_bytes=0), KeyBox.load(data_dir))
    base = sys.argv[sys.argv.index("--upstream-url") + 1]
    pad = b"x" * max(0, body_bytes - 40)
    for number in range(entries):
        headers = Headers({b"dd-api-key": [b"0123456789abcdef0123456789abcdef"],
                           b"content-type": [b"application/json"], b"x-seq": [str(number).encode()]})
        body = b'{"seq": %d, "pad": "%s"}' % (number, pad)
        _, ops = spool.entry_ops(base, b"POST", b"/api/v2/series", headers, body)
        store.submit(ops)
        if number % 2000 == 1999:
            clock.advance(0)
    clock.advance(0)
    store.close()
    clock.advance(0)


def upstream(port_file: str) -> None:
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class Accept(Resource):
        isLeaf = True
        count = 0

        def render(self, request):
            Accept.count += 1
            request.setResponseCode(202)
            return b"{}"

    site = Site(Accept())
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    with open(port_file, "w") as handle:
        handle.write(str(port.getHost().port))
    reactor.run()


def drain(data_dir: str, timeout: float, concurrency: int, batch_size: int) -> dict:
    from twisted.internet import reactor, task

    from reductrai.forward import Forwarder
    from reductrai.keybox import KeyBox
    from reductrai.spool import Spool, SpoolOptions
    from reductrai.spool.entries import SPOOL_DB
    from reductrai.store import RecordStore, StoreOptions

    store = RecordStore(StoreOptions(path=os.path.join(data_dir, "store"), durability="none"), reactor)
    store.open()
    forwarder = Forwarder(reactor, max_in_flight=concurrency * 2, timeout=10.0)
    options = SpoolOptions(max_bytes=0, max_concurrency=concurrency, drain_rate=0, batch_size=batch_size,
                           backoff_base=0.05, backoff_cap=1.0)
    spool = Spool(store, forwarder, reactor, options, KeyBox.load(data_dir))
    result: dict = {}

    def depth() -> int:
        handle = store.database(SPOOL_DB)
        with store.env.begin() as txn:
            return txn.stat(handle)["entries"]

    result["pending_before"] = depth()
    result["rss_before_drain_kib"] = rss_now_kib()
    result["rss_anon_before_drain_kib"] = rss_now_kib("RssAnon")
    result["peak_rss_before_drain_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()

    def check():
        left = depth()
        if left == 0 or time.monotonic() - started > timeout:
            result["pending_after"] = left
            result["seconds"] = round(time.monotonic() - started, 2)
            result["rss_anon_after_drain_kib"] = rss_now_kib("RssAnon")
            result["rss_file_after_drain_kib"] = rss_now_kib("RssFile")
            loop.stop()
            spool.stop().addBoth(lambda _: store.close()).addBoth(lambda _: reactor.stop())

    loop = task.LoopingCall(check)
    reactor.callWhenRunning(spool.start)
    reactor.callWhenRunning(loop.start, 0.5, now=False)
    reactor.run()
    result["delivered"] = spool.counters.delivered
    result["retries"] = spool.counters.retries
    result["largest_batch"] = spool.counters.largest_batch
    result["batches_read"] = spool.counters.batches_read
    result["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--body-bytes", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds the drain may take")
    parser.add_argument("--role", choices=("main", "fill", "upstream"), default="main", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--upstream-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "fill":
        fill(args.dir, args.entries, args.body_bytes)
        return 0
    if args.role == "upstream":
        upstream(args.dir)
        return 0

    work = tempfile.mkdtemp(prefix="spool-bench-")
    port_file = os.path.join(work, "port")
    server = subprocess.Popen([sys.executable, __file__, "--role", "upstream", "--dir", port_file])
    try:
        for _ in range(200):
            if os.path.exists(port_file) and open(port_file).read():
                break
            time.sleep(0.05)
        url = f"http://127.0.0.1:{open(port_file).read()}"
        began = time.monotonic()
        subprocess.run([sys.executable, __file__, "--role", "fill", "--dir", work, "--entries", str(args.entries),
                        "--body-bytes", str(args.body_bytes), "--upstream-url", url], check=True, timeout=900)
        filled = time.monotonic() - began
        result = drain(work, args.timeout, args.concurrency, args.batch_size)
        result.update(entries=args.entries, body_bytes=args.body_bytes, fill_seconds=round(filled, 2),
                      data_mdb_bytes=os.path.getsize(os.path.join(work, "store", "data.mdb")))
        print(json.dumps(result, indent=2))
        return 0 if result.get("pending_after") == 0 else 1
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
