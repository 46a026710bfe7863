"""
Limits on what clients may do: how many connections, how large a request
head, how long to send a request, which networks may connect and how fast
one client may send.

L{ConnectionLimits} holds the per-listener numbers that the HTTP channel of
L{reductrai.request} enforces; L{NetworkAllowList} and
L{ClientRateLimiter} are the ingest access rules, and L{IngestGuard} applies
the rate limit in front of the ingest resource.
"""

from __future__ import annotations

import ipaddress
import json
import math
import time
from typing import Callable, Iterable, Optional, Sequence, Union

import attrs
from twisted.logger import Logger, LogLevel
from twisted.web.resource import Resource

from reductrai.ratelimit import RateLimitedLog

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def parse_networks(values: Iterable[str], setting: str = "limits.allow_networks") -> list[Network]:
    """
    Parse CIDR networks (a bare address is a network of one address).

    @raise ValueError: a value is not a network; the message names the
        setting and the value.
    """
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"{setting}: invalid value {value!r}; expected a network such as "
                f"10.0.0.0/8, 2001:db8::/32 or 127.0.0.1"
            ) from None
    return networks


class NetworkAllowList:
    """
    The client networks allowed to connect; an empty list allows every
    address.
    """

    def __init__(self, networks: Sequence[Network] = ()) -> None:
        self.networks = tuple(networks)

    def allows(self, host: Optional[str]) -> bool:
        """
        Whether a peer address may connect.  A peer without an IP address
        (a UNIX socket) is always allowed: file permissions guard it.

        @param host: the peer's IP address as text, or L{None}.
        """
        if not self.networks or host is None:
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


@attrs.define
class ConnectionLimits:
    """
    The limits of one listener role, and where to count what they refuse.

    @ivar role: C{"ingest"} or C{"admin"}, the label of the metrics.
    @ivar max_connections: open connections beyond which a new one gets 503.
    @ivar max_header_count: header fields per request beyond which 431.
    @ivar max_header_bytes: bytes of request line and headers beyond which 431.
    @ivar request_deadline: seconds to receive one whole request, else 408.
    @ivar allow: the networks that may connect.
    @ivar metrics: a L{reductrai.metrics.Metrics}, or L{None}.
    @ivar board: the L{reductrai.balance.ConnectionBoard} that gets the
        open connection count, with several worker processes.
    """

    role: str = "ingest"
    max_connections: int = 1024
    max_header_count: int = 100
    max_header_bytes: int = 16384
    request_deadline: float = 300.0
    allow: NetworkAllowList = attrs.field(factory=NetworkAllowList)
    metrics: object = None
    open_connections: int = 0
    board: object = None

    @classmethod
    def from_settings(cls, settings, role: str, metrics=None) -> "ConnectionLimits":
        """
        Build the limits of C{role} from the settings; the network allow-list
        applies to the ingest role only.

        @raise ValueError: C{limits.allow_networks} holds an invalid network.
        """
        allow = NetworkAllowList(parse_networks(settings["limits.allow_networks"])) if role == "ingest" else NetworkAllowList()
        return cls(
            role=role,
            max_connections=settings["limits.max_connections"],
            max_header_count=settings["limits.max_header_count"],
            max_header_bytes=settings["limits.max_header_bytes"],
            request_deadline=settings["limits.request_deadline"],
            allow=allow,
            metrics=metrics,
        )

    def hit(self, limit: str) -> None:
        """
        Count one refusal by C{limit}.
        """
        if self.metrics is not None:
            self.metrics.limits_hit.labels(self.role, limit).inc()

    def opened(self) -> None:
        self.open_connections += 1
        if self.metrics is not None:
            self.metrics.connections_open.labels(self.role).inc()
        if self.board is not None:
            self.board.publish(self.open_connections)

    def closed(self) -> None:
        self.open_connections -= 1
        if self.metrics is not None:
            self.metrics.connections_open.labels(self.role).dec()
        if self.board is not None:
            self.board.publish(self.open_connections)


class ClientRateLimiter:
    """
    One token bucket per client: C{rate} tokens a second up to C{burst}.

    Buckets that have refilled completely are forgotten, so memory follows
    the number of clients active in the last C{burst / rate} seconds.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        """
        @param rate: sustained requests per second; C{0} allows everything.
        @param burst: requests allowed at once.
        """
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._last_prune = clock()

    def acquire(self, client: str) -> float:
        """
        Take one token for C{client}.

        @return: C{0.0} when the request may proceed, else the seconds until
            a token is available.
        """
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        tokens, stamp = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[client] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        self._prune(now)
        return wait

    def _prune(self, now: float) -> None:
        full_after = self.burst / self.rate
        if now - self._last_prune < full_after:
            return
        self._last_prune = now
        for client, (tokens, stamp) in list(self._buckets.items()):
            if tokens + (now - stamp) * self.rate >= self.burst:
                del self._buckets[client]

    def __len__(self) -> int:
        return len(self._buckets)


def client_identity(request) -> str:
    """
    Name the client of a request for per-client rules: C{cert:} and the
    subject of its verified TLS client certificate, else C{addr:} and its
    IP address.
    """
    from reductrai.tls import peer_certificate_subject

    subject = peer_certificate_subject(getattr(request, "transport", None))
    if subject:
        return "cert:" + subject
    peer = request.getClientAddress()
    return "addr:" + str(getattr(peer, "host", peer))


class IngestGuard(Resource):
    """
    The per-client request rate limit in front of the ingest resource: a
    client over its rate gets 429 with C{Retry-After}, counted as the
    C{client_rate} limit; other requests go to the wrapped resource.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, wrapped: Resource, limiter: ClientRateLimiter, limits: Optional[ConnectionLimits] = None) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.limiter = limiter
        self.limits = limits
        self._log = RateLimitedLog(self.log)

    def render(self, request):
        client = client_identity(request)
        wait = self.limiter.acquire(client)
        if not wait:
            return self.wrapped.render(request)
        if self.limits is not None:
            self.limits.hit("client_rate")
        self._log.emit(
            "client_rate:" + client,
            LogLevel.warn,
            "Client {client} is over its request rate; answering 429",
            client=client,
        )
        request.setResponseCode(429)
        request.setHeader(b"retry-after", str(max(1, math.ceil(wait))).encode("ascii"))
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {"errors": [f"too many requests from this client; the limit is {self.limiter.rate:g} a second"]}
        ).encode("utf-8")
