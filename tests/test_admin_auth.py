"""
The admin listener's credentials: open probes, 401 without a configured
credential, bearer tokens, htpasswd users, failures rate-limited per
address, and paths added to the tree later protected as well.
"""

from __future__ import annotations

import base64
import json

import bcrypt
import pytest
import pytest_twisted
from twisted.web.resource import Resource

from reductrai.auth import HOW_TO_CONFIGURE, AdminAuthenticator, listeners_are_loopback
from tests.support import send_raw, start_daemon

TOKEN = "admin-token-4c1d8e0f7a"


async def get(port: int, path: str, authorization: str | None = None):
    headers = [("Host", "admin")]
    if authorization is not None:
        headers.append(("Authorization", authorization))
    status, response_headers, body = await send_raw(port, "GET", path, headers, b"")
    return status, dict((name.lower(), value) for name, value in response_headers), body


class Extra(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"query api"


@pytest_twisted.ensureDeferred
async def test_no_credential_configured(tmp_path):
    """
    Without credentials, /health and /ready answer while /metrics and any
    other path answer 401 saying how to configure a credential.
    """
    daemon = start_daemon(tmp_path / "data")
    try:
        assert (await get(daemon.admin_port, "/health"))[0] == 200
        assert (await get(daemon.admin_port, "/ready"))[0] == 200
        for path in ("/metrics", "/", "/api/v1/anything"):
            status, _, body = await get(daemon.admin_port, path)
            assert status == 401
            assert json.loads(body)["error"] == HOW_TO_CONFIGURE
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_unauthenticated_loopback_opt_in(tmp_path):
    """
    admin.allow_unauthenticated_loopback opens the loopback-only admin
    listener while no credential is configured.
    """
    daemon = start_daemon(tmp_path / "data", admin__allow_unauthenticated_loopback=True)
    try:
        status, headers, _ = await get(daemon.admin_port, "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
    finally:
        await daemon.stop()


def test_loopback_detection():
    """
    Only loopback TCP/TLS interfaces and UNIX sockets count as loopback.
    """
    assert listeners_are_loopback(["tcp:8081:interface=127.0.0.1", "tcp:8082:interface=\\:\\:1", "unix:/run/a.sock"])
    assert not listeners_are_loopback(["tcp:8081"])
    assert not listeners_are_loopback(["tcp:8081:interface=0.0.0.0"])
    assert AdminAuthenticator(allow_unauthenticated=False).open is False


@pytest_twisted.ensureDeferred
async def test_bearer_tokens(tmp_path):
    """
    A listed token opens every path, including one added to the tree
    after start; a wrong or missing token gets 401 with a challenge.
    """
    tokens = tmp_path / "tokens"
    tokens.write_text("# admin tokens\n\nother-token\n" + TOKEN + "\n")
    daemon = start_daemon(tmp_path / "data", admin__tokens_file=str(tokens))
    daemon.service.admin_ports[0].factory.resource.putChild(b"api", Extra())
    try:
        status, _, body = await get(daemon.admin_port, "/metrics", f"Bearer {TOKEN}")
        assert status == 200 and b"reductrai_requests" in body
        status, _, body = await get(daemon.admin_port, "/api/v1/query", f"Bearer {TOKEN}")
        assert (status, body) == (200, b"query api")
        for authorization in (None, "Bearer wrong", f"Bearer {TOKEN}x", f"Basic {TOKEN}"):
            status, headers, body = await get(daemon.admin_port, "/api/v1/query", authorization)
            assert status == 401, authorization
            assert "bearer" in headers["www-authenticate"].lower()
            assert TOKEN.encode() not in body
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_htpasswd_users(tmp_path):
    """
    An htpasswd user with the right password is served; a wrong password
    or an unknown user gets 401.
    """
    htpasswd = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"s3cret pass", bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"ops:{hashed}\n")
    daemon = start_daemon(tmp_path / "data", admin__htpasswd_file=str(htpasswd))

    def basic(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    try:
        assert (await get(daemon.admin_port, "/metrics", basic("ops", "s3cret pass")))[0] == 200
        assert (await get(daemon.admin_port, "/metrics", basic("ops", "wrong")))[0] == 401
        assert (await get(daemon.admin_port, "/metrics", basic("nobody", "s3cret pass")))[0] == 401
        status, headers, _ = await get(daemon.admin_port, "/metrics", "Basic !!!")
        assert status == 401 and "basic" in headers["www-authenticate"].lower()
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_failures_rate_limited(tmp_path):
    """
    After admin.max_auth_failures wrong tokens from one address, that
    address gets 429 with Retry-After, even with the right token; the
    failures are counted in the metrics.
    """
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    daemon = start_daemon(tmp_path / "data", admin__tokens_file=str(tokens), admin__max_auth_failures=3)
    try:
        for _ in range(3):
            assert (await get(daemon.admin_port, "/metrics", "Bearer guess"))[0] == 401
        status, headers, _ = await get(daemon.admin_port, "/metrics", f"Bearer {TOKEN}")
        assert status == 429 and 1 <= int(headers["retry-after"]) <= 60
        assert (await get(daemon.admin_port, "/health"))[0] == 200
        rendered = daemon.service.metrics.render().decode()
        assert 'reductrai_admin_auth_failures_total{reason="wrong_token"} 3.0' in rendered
        assert 'reductrai_admin_auth_failures_total{reason="blocked"} 1.0' in rendered
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_tokens_reloaded(tmp_path):
    """
    A reload (SIGHUP) reads the tokens file again: a removed token stops
    working, a new one works.
    """
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    daemon = start_daemon(tmp_path / "data", admin__tokens_file=str(tokens))
    try:
        tokens.write_text("replacement-token\n")
        assert daemon.service.reloader.reload() == 0
        assert (await get(daemon.admin_port, "/metrics", f"Bearer {TOKEN}"))[0] == 401
        assert (await get(daemon.admin_port, "/metrics", "Bearer replacement-token"))[0] == 200
    finally:
        await daemon.stop()


def test_invalid_htpasswd_refused(tmp_path):
    """
    An htpasswd entry that is not bcrypt is refused with its line number.
    """
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("ops:$apr1$abc$def\n")
    with pytest.raises(ValueError, match="line 1"):
        AdminAuthenticator(htpasswd_file=str(htpasswd))
