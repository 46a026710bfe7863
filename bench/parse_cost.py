"""
Measure what parsing costs per request, per corpus folder: decoding the
body alone against decoding and parsing it into items, in microseconds.

    /work/venv/bin/python bench/parse_cost.py [--repeat N]

Parsing runs only where the mode needs items (store-only and sample modes
answer for the vendor, forward mode indexes items when
storage.index_items is on); forward-only never parses.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reductrai.encoding import decode_body  # noqa: E402
from reductrai.formats.items import PayloadContext  # noqa: E402
from reductrai.vendors.registry import default_router  # noqa: E402
from tests import corpus  # noqa: E402


def measure(repeat: int) -> list[tuple[str, int, float, float, int]]:
    router = default_router()
    rows = []
    for folder in corpus.folders():
        requests = corpus.load(folder)
        decode_total = parse_total = 0.0
        items = 0
        for request in requests:
            content_type = request.header("content-type")
            match = router.match(request.path, content_type)
            encoding = request.header("content-encoding")
            context = PayloadContext(
                path=request.path, content_type=content_type,
                query=parse_qs(request.meta["query"]), headers={k.lower(): v for k, v in request.headers},
            )
            started = time.perf_counter()
            for _ in range(repeat):
                decoded = decode_body(request.body, encoding, 1 << 26)
            decode_total += (time.perf_counter() - started) / repeat
            started = time.perf_counter()
            for _ in range(repeat):
                parsed = match.route.parser(decode_body(request.body, encoding, 1 << 26), context)
            parse_total += (time.perf_counter() - started) / repeat
            items += len(parsed.items)
        count = len(requests)
        rows.append((folder, count, decode_total / count * 1e6, parse_total / count * 1e6, items // count))
    return rows


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    arguments.add_argument("--repeat", type=int, default=200, help="timed runs per request (default 200)")
    options = arguments.parse_args()
    print("| corpus folder | requests | decode µs | decode + parse µs | items per request |")
    print("|---|---:|---:|---:|---:|")
    for folder, count, decode, parse, items in measure(options.repeat):
        print(f"| {folder} | {count} | {decode:.1f} | {parse:.1f} | {items} |")


if __name__ == "__main__":
    main()
