"""
A known API key sent through every path (success, 4xx, 5xx, upstream
down, with every log level observed) appears nowhere reductrai keeps it:
not in any log event, not in the metrics or /health, not in any file of
the data directory nor in the exported records.
"""

from __future__ import annotations

import json

import pytest_twisted
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from reductrai.logformat import event_as_line
from tests.support import Reply, Upstream, run_inspect, send_raw, start_daemon

CLIENT_KEY = "c0ffee5ecretclientkey0123456789ab"
CONFIGURED_KEY = "feedface5ecretconfiguredkey98765"
ADMIN_TOKEN = "adm1n5ecrettoken555"


@pytest_twisted.ensureDeferred
async def test_keys_never_kept(tmp_path):
    """
    Requests carrying the client key in a header, the query and the path,
    and requests relying on the configured key, through success, 404,
    405, an upstream 500 and an unreachable upstream.
    """
    key_file = tmp_path / "dd_api_key"
    key_file.write_text(CONFIGURED_KEY + "\n")
    tokens = tmp_path / "tokens"
    tokens.write_text(ADMIN_TOKEN + "\n")
    events: list[dict] = []
    observer = events.append
    globalLogPublisher.addObserver(observer)

    replies = iter([Reply(202), Reply(500, body=b'{"errors":["boom"]}')] + [Reply(202)] * 20)
    upstream = Upstream(lambda received: next(replies))
    # The recording upstream stands for the vendor, which does receive the
    # key; its access log is not reductrai's and is switched off.
    upstream.port.factory.log = lambda request: None
    daemon = start_daemon(
        tmp_path / "data",
        environ={"DD_API_KEY_FILE": str(key_file)},
        proxy__forward_to=upstream.url,
        admin__tokens_file=str(tokens),
    )
    body = b'{"series":[]}'
    json_headers = [("Host", "x"), ("Content-Type", "application/json")]
    try:
        port = daemon.http_port
        sent = [
            ("POST", "/api/v2/series", json_headers + [("DD-API-KEY", CLIENT_KEY)], body),  # 202
            ("POST", "/api/v2/series", json_headers + [("DD-API-KEY", CLIENT_KEY)], body),  # upstream 500
            ("POST", f"/api/v2/series?api_key={CLIENT_KEY}", json_headers, body),
            ("POST", f"/v1/input/{CLIENT_KEY}", [("Host", "x"), ("Content-Type", "text/plain")], b"log line"),
            ("POST", "/api/v2/series", json_headers, body),  # the configured key is added
            ("GET", f"/no/such/path?api_key={CLIENT_KEY}", [("Host", "x"), ("DD-API-KEY", CLIENT_KEY)], b""),
            ("DELETE", f"/api/v2/series?api_key={CLIENT_KEY}", [("Host", "x")], b""),
            ("POST", "/api/v2/series", json_headers + [("DD-API-KEY", CLIENT_KEY), ("Content-Encoding", "gzip")], b"not gzip"),
        ]
        statuses = []
        for method, target, headers, payload in sent:
            statuses.append((await send_raw(port, method, target, headers, payload))[0])
        await upstream.stop()
        statuses.append((await send_raw(port, "POST", "/api/v2/series", json_headers + [("DD-API-KEY", CLIENT_KEY)], body))[0])
        statuses.append((await send_raw(port, "POST", "/api/v2/series", json_headers, body))[0])
        # The upstream's 500 and the unreachable upstream leave the requests
        # in the spool (credentials encrypted), answered as accepted.
        assert statuses[0] == 202
        assert statuses[1] == 202
        assert any(400 <= status < 500 for status in statuses), statuses
        assert statuses[-2:] == [202, 202]
        assert daemon.service.spool.status()["depth"] >= 2
        # The configured key did reach the upstream, so it was in use.
        assert any(r.header("DD-API-KEY") == CONFIGURED_KEY.encode() for r in upstream.received)

        admin = daemon.admin_port
        _, _, health = await send_raw(admin, "GET", "/health", [("Host", "x")], b"")
        _, _, metrics = await send_raw(admin, "GET", "/metrics", [("Host", "x"), ("Authorization", f"Bearer {ADMIN_TOKEN}")], b"")
        _, _, refused = await send_raw(admin, "GET", "/metrics", [("Host", "x"), ("Authorization", f"Bearer {CLIENT_KEY}")], b"")
        assert b"reductrai_requests" in metrics
        exported = await run_inspect(daemon.data_dir, "export")
        assert exported.count("\n") >= 4
    finally:
        globalLogPublisher.removeObserver(observer)
        await daemon.stop()

    logged = []
    for event in events:
        logged.append(formatEvent(event))
        logged.append(event_as_line(event))
        logged.append(repr(event))
    assert any(event.get("log_level") == LogLevel.warn for event in events)
    texts = {"logs": "\n".join(logged), "health": health.decode(), "metrics": metrics.decode(),
             "refusal": refused.decode(), "export": exported, "settings": repr(daemon.service.settings)}
    files = [path for path in daemon.data_dir.rglob("*") if path.is_file()]
    assert files
    for secret in (CLIENT_KEY, CONFIGURED_KEY, ADMIN_TOKEN):
        for where, text in texts.items():
            assert secret not in text, where
        for path in files:
            assert secret.encode() not in path.read_bytes(), path
    assert json.loads(health)["status"] == "ok"
