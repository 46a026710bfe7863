"""
Suite-wide guards.

No test may reach a real vendor host: every name lookup made in the test
process must resolve a loopback name or address, and any other lookup fails
the test that made it.
"""

from __future__ import annotations

import socket

import pytest

_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}

_original_getaddrinfo = socket.getaddrinfo
_blocked_lookups: list[str] = []


def _is_loopback(host: object) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    text = str(host)
    return text in _LOOPBACK_NAMES or text.startswith("127.") or text == ""


def _guarded_getaddrinfo(host, *args, **kwargs):
    if not _is_loopback(host):
        _blocked_lookups.append(str(host))
        raise socket.gaierror(socket.EAI_NONAME, f"test network guard: lookup of {host!r} blocked")
    return _original_getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _guarded_getaddrinfo


@pytest.fixture(autouse=True)
def _no_vendor_hosts():
    """
    Fail any test during which a non-loopback host name was looked up.
    """
    del _blocked_lookups[:]
    yield
    assert not _blocked_lookups, f"test tried to reach non-loopback hosts: {_blocked_lookups}"
