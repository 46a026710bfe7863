"""
The C{twistd reductrai} plugin as users run it: a separate process, its
start-up messages, its exit status, and what it writes to disk and logs.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.support import Upstream, send_raw

API_KEY = "feedfacecafebeef0123456789abcdef"
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def twistd(*arguments: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """
    Start C{twistd -n --pidfile= reductrai ARGUMENTS} with its output in a
    pipe.
    """
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("REDUCTRAI_", "DD_", "DATADOG_"))}
    environment.update(env or {})
    return subprocess.Popen(
        [*TWISTD, "-n", "--pidfile=", "reductrai", *arguments],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment, cwd=cwd,
    )


def wait_for_ports(process: subprocess.Popen, count: int, timeout: float = 30.0) -> tuple[list[int], list[str]]:
    """
    Read the daemon's log until C{count} listeners are reported; return
    their ports in order and the lines read.
    """
    ports: list[int] = []
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    os.set_blocking(process.stdout.fileno(), True)
    while len(ports) < count and time.monotonic() < deadline:
        line = process.stdout.readline().decode("utf-8", "replace")
        if not line:
            break
        lines.append(line)
        found = re.search(r"Listening for \w+ traffic on .* \(port (\d+)\)", line)
        if found:
            ports.append(int(found.group(1)))
    if len(ports) < count:
        process.kill()
        raise AssertionError("daemon did not start:\n" + "".join(lines))
    return ports, lines


def stop(process: subprocess.Popen, lines: list[str]) -> str:
    """
    Stop the daemon with SIGTERM and return its whole log.
    """
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=30)
    return "".join(lines) + rest.decode("utf-8", "replace")


@pytest_twisted.ensureDeferred
async def test_keys_never_stored_or_logged(tmp_path):
    """
    A key sent in a header, in the query and in the path reaches the
    upstream and appears in no file of the data directory (the spool keeps
    it encrypted) and no log line, also when requests fail.
    """
    upstream = Upstream()
    data_dir = tmp_path / "data"
    process = twistd(
        "--data-dir", str(data_dir), "--listen", "tcp:0:interface=127.0.0.1",
        "--listen", "ssl:0:interface=127.0.0.1", "--admin-listen", "tcp:0:interface=127.0.0.1",
        env={"FORWARD_TO": upstream.url, "PROXY_MODE": "forward"},
    )
    try:
        (http_port, https_port, admin_port), lines = await threads.deferToThread(wait_for_ports, process, 3)
        certificate = str(data_dir / "tls" / "dev-cert.pem")
        body = b'[{"message":"hello","service":"svc"}]'
        for target, headers in [
            ("/api/v2/logs", [("DD-API-KEY", API_KEY)]),
            (f"/api/v2/logs?api_key={API_KEY}&ddtags=env:test", []),
            (f"/v1/input/{API_KEY}", []),
            ("/api/v2/series", [("DD-API-KEY", API_KEY), ("Content-Encoding", "compress")]),
            (f"/v1/input/{API_KEY}", [("Content-Encoding", "gzip")]),
            ("/nowhere", [("DD-API-KEY", API_KEY)]),
            ("/api/v2/logs", [("DD-API-KEY", API_KEY), ("Content-Type", "text/plain")]),
        ]:
            await send_raw(
                https_port, "POST", target,
                [("Host", "x"), ("Content-Type", "application/json"), *headers], body, tls_ca=certificate,
            )
        await upstream.stop()
        status, headers, _ = await send_raw(http_port, "POST", f"/v1/input/{API_KEY}", [("Host", "x")], body)
        assert status == 200
        assert dict((k.lower(), v) for k, v in headers)["x-reductrai-queued"] == "true"
        forwarded = [r for r in upstream.received if API_KEY.encode() in r.uri or r.header("dd-api-key")]
        assert len(forwarded) == 5
    finally:
        log = await threads.deferToThread(stop, process, lines)
    # twistd ends by re-raising the signal it stopped on.
    assert process.returncode in (0, -signal.SIGTERM), log
    assert "Upstream" in log and "is down" in log
    assert API_KEY not in log
    files = [path for path in data_dir.rglob("*") if path.is_file()]
    assert any(path.name == "data.mdb" for path in files)
    for path in files:
        assert API_KEY.encode() not in path.read_bytes(), path


def test_bind_failure_exits_with_message(tmp_path):
    """
    A listener that cannot bind stops the start with status 1 and a message
    naming the listener.
    """
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        process = twistd(
            "--data-dir", str(tmp_path / "data"), "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--admin-listen", "tcp:0:interface=127.0.0.1",
        )
        output, _ = process.communicate(timeout=60)
    text = output.decode()
    assert process.returncode == 1, text
    assert f"cannot listen on 'tcp:{port}:interface=127.0.0.1'" in text
    assert "Address already in use" in text


@pytest.mark.parametrize(
    "environment, expected",
    [
        ({"PROXY_MODE": "mirror"}, "proxy.mode: invalid value 'mirror' from environment variable PROXY_MODE; allowed:"),
        ({"SAMPLE_RATE": "2"}, "proxy.sample_rate: invalid value '2' from environment variable SAMPLE_RATE; the maximum is 1"),
        ({"REDUCTRAI_PORT": "http"}, "server.port: invalid value 'http' from environment variable REDUCTRAI_PORT; expected an integer"),
        ({"FORWARD_TO": "ftp://example.invalid"}, "proxy.forward_to: invalid value 'ftp://example.invalid'"),
    ],
)
def test_invalid_configuration_exits(tmp_path, environment, expected):
    """
    A wrong value fails the start with status 2 and a message naming the
    setting, the value and what is allowed.
    """
    process = twistd("--data-dir", str(tmp_path / "data"), env=environment)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2
    assert expected in output.decode()
    assert not (tmp_path / "data").exists()


def test_secret_file_missing_never_prints_value(tmp_path):
    """
    A missing secret file is reported by path; the secret given directly
    in the environment never shows in --help or in errors.
    """
    process = twistd(env={"DATADOG_API_KEY_FILE": str(tmp_path / "absent")})
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "datadog.api_key: cannot read secret file" in output.decode()

    process = twistd("--help", env={"DATADOG_API_KEY": API_KEY})
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    assert API_KEY not in output.decode()
    assert "--forward-to" in output.decode()
