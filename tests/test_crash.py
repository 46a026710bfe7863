"""
Crash safety of the accept path: every request the daemon answered 2xx
reaches the upstream, even when C{twistd} is killed with SIGKILL while
requests are arriving and the upstream is failing.

The daemon runs as C{twistd -n --pidfile= reductrai} in a subprocess on
127.0.0.1 ports; the upstream is a recording server in this process.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

TWISTD = str(Path(sys.executable).with_name("twistd"))
KILLS = 3
REQUESTS_PER_ROUND = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RecordingUpstream:
    """
    A threaded HTTP server on 127.0.0.1 that records the C{X-Seq} of each
    request it answers 2xx, and answers 503 while C{failing} is set.
    """

    def __init__(self) -> None:
        self.failing = True
        self.delivered: list[int] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                status = 503 if owner.failing else 202
                if status == 202:
                    with owner.lock:
                        owner.delivered.append(int(self.headers.get("x-seq", "-1")))
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Daemon:
    """
    C{twistd -n reductrai} in a subprocess; stopped by its PID only.
    """

    def __init__(self, data_dir: Path, upstream_url: str) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        environ = dict(os.environ)
        environ.update({
            "REDUCTRAI_STORAGE_DURABILITY": "fsync",
            "REDUCTRAI_SPOOL_BACKOFF_BASE": "0.05",
            "REDUCTRAI_SPOOL_BACKOFF_CAP": "0.5",
            "REDUCTRAI_UPSTREAM_TIMEOUT": "2",
        })
        self.log = open(data_dir.parent / f"twistd-{self.port}.log", "wb")
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "reductrai", "--data-dir", str(data_dir), "--forward-to", upstream_url,
             "--listen", f"tcp:{self.port}:interface=127.0.0.1",
             "--admin-listen", f"tcp:{self.admin_port}:interface=127.0.0.1"],
            env=environ, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited with {self.process.returncode}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=1)
                connection.request("GET", "/ready")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("twistd did not become ready")

    def send(self, seq: int) -> int:
        """
        Send one Datadog series request; return the status, or 0 when the
        connection failed (the request does not count as acknowledged).
        """
        body = json.dumps({"series": [{"metric": "crash.test", "points": [{"timestamp": 1, "value": seq}]}]}).encode()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            connection.request("POST", "/api/v2/series", body, {
                "Content-Type": "application/json", "DD-API-KEY": "0123456789abcdef0123456789abcdef",
                "X-Seq": str(seq),
            })
            return connection.getresponse().status
        except OSError:
            return 0

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self.log.close()

    def terminate(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.log.close()



def test_every_acknowledged_request_survives_sigkill(tmp_path):
    upstream = RecordingUpstream()
    data_dir = tmp_path / "data"
    acknowledged: list[int] = []
    seq = 0
    try:
        for round_number in range(KILLS):
            # Alternate a failing and a working upstream so that some
            # entries are spooled and some are mid-delivery at the kill.
            upstream.failing = round_number % 2 == 0
            daemon = Daemon(data_dir, upstream.url)

            def sender():
                nonlocal seq
                for _ in range(REQUESTS_PER_ROUND):
                    seq += 1
                    if 200 <= daemon.send(seq) <= 299:
                        acknowledged.append(seq)

            first_seq = seq
            thread = threading.Thread(target=sender, daemon=True)
            thread.start()
            # Kill part-way through the round, while requests are in flight.
            deadline = time.monotonic() + 20
            while seq - first_seq < REQUESTS_PER_ROUND // 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            daemon.kill()
            thread.join(timeout=30)

        upstream.failing = False
        daemon = Daemon(data_dir, upstream.url)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with upstream.lock:
                    missing = set(acknowledged) - set(upstream.delivered)
                if not missing:
                    break
                time.sleep(0.2)
        finally:
            daemon.terminate()
        with upstream.lock:
            delivered = list(upstream.delivered)
        missing = sorted(set(acknowledged) - set(delivered))
        duplicates = len(delivered) - len(set(delivered))
        print(f"crash: {len(acknowledged)} acknowledged, {len(set(delivered))} delivered, {duplicates} duplicates")
        assert acknowledged, "no request was acknowledged"
        assert missing == [], f"acknowledged but never delivered: {missing}"
    finally:
        upstream.close()
