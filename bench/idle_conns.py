"""
Open many idle TLS keep-alive connections to 127.0.0.1:PORT, hold them,
then close them; bounded in time.

Usage: C{python idle_conns.py PORT COUNT HOLD_SECONDS [OPEN_TIMEOUT]}

It raises its own open-file limit, opens C{COUNT} connections (200
handshakes at a time, certificates not verified), prints
C{OPEN {"opened": n, "failed": m, "seconds": s}} once the opening phase
ends, keeps them open for C{HOLD_SECONDS}, counts how many the server closed
meanwhile and prints C{DONE {...}}.
"""

from __future__ import annotations

import asyncio
import json
import resource
import ssl
import sys
import time


async def main(port: int, count: int, hold: float, open_timeout: float) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    gate = asyncio.Semaphore(200)
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    failures: dict[str, int] = {}
    deadline = time.monotonic() + open_timeout

    async def connect() -> None:
        async with gate:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failures["open timeout"] = failures.get("open timeout", 0) + 1
                return
            try:
                pair = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost"),
                    remaining,
                )
                connections.append(pair)
            except (OSError, asyncio.TimeoutError, ssl.SSLError) as error:
                name = type(error).__name__
                failures[name] = failures.get(name, 0) + 1

    started = time.monotonic()
    await asyncio.gather(*(connect() for _ in range(count)))
    opened_in = time.monotonic() - started
    print("OPEN " + json.dumps({"opened": len(connections), "failed": failures, "seconds": round(opened_in, 2)}),
          flush=True)
    await asyncio.sleep(hold)
    closed_by_server = sum(1 for reader, _ in connections if reader.at_eof())
    for _, writer in connections:
        writer.transport.abort()
    print("DONE " + json.dumps({"held": len(connections), "closed_by_server": closed_by_server}), flush=True)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    asyncio.run(main(int(arguments[0]), int(arguments[1]), float(arguments[2]),
                     float(arguments[3]) if len(arguments) > 3 else 90.0))
