"""
Parts of the full-disk tests: request bodies that carry their own number,
an upstream that can come back on the port it had, and a small client
for the admin listener.
"""

from __future__ import annotations

import base64
import http.client
import json
import random
from typing import Callable, Optional

import attrs
from twisted.internet import defer, reactor, threads

from tests.support import Received, Reply, Upstream, _TrackingSite, RecordingResource

API_KEY = "0123456789abcdef0123456789abcdef"


@attrs.define
class Exchange:
    """
    One request sent to the daemon and its response.
    """

    number: int
    body: bytes
    status: int
    headers: dict[str, str]
    answer: bytes


def log_body(number: int, rng: random.Random, size: int) -> bytes:
    """
    A Datadog logs payload of about C{size} bytes that compresses poorly
    (base64 of random bytes) and names its C{number} in C{ddtags}.
    """
    noise = base64.b64encode(rng.randbytes(size * 3 // 4)).decode("ascii")
    document = [{"message": noise, "service": "fill", "ddsource": "test", "ddtags": f"n:{number}"}]
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def marker_of(body: bytes) -> Optional[int]:
    """
    Return the number a body from L{log_body} carries, or L{None}.
    """
    try:
        document = json.loads(body)
        tags = document[0]["ddtags"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if not tags.startswith("n:"):
        return None
    return int(tags[2:])


class ReusableUpstream(Upstream):
    """
    A recording upstream listening on a given port of 127.0.0.1, so that
    an upstream stopped earlier can come back where clients expect it.
    """

    def __init__(self, port: int, reply_for: Callable[[Received], Reply] = lambda r: Reply()) -> None:
        self.resource = RecordingResource(reply_for)
        site = _TrackingSite(self.resource)
        site.noisy = False
        self._site = site
        self.port = reactor.listenTCP(port, site, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"


def http_get(port: int, path: str, timeout: float = 10.0) -> "defer.Deferred[tuple[int, bytes]]":
    """
    GET C{path} from 127.0.0.1:C{port} in a thread.

    @return: a L{Deferred} firing with C{(status, body)}.
    """

    def get():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    return threads.deferToThread(get)
