"""
The daemon's Prometheus metrics, in a registry of its own.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]


class Metrics:
    """
    Counters and histograms of one daemon, exposed by C{/metrics}.
    """

    def __init__(self) -> None:
        self._children: dict = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "reductrai_requests",
            "Ingest requests by vendor, kind, route and answered status.",
            ["vendor", "kind", "route", "status"],
            registry=self.registry,
        )
        self.received_bytes = Counter(
            "reductrai_received_bytes",
            "Request body bytes as received, by vendor and kind.",
            ["vendor", "kind"],
            registry=self.registry,
        )
        self.decoded_bytes = Counter(
            "reductrai_decoded_bytes",
            "Request body bytes after undoing the content-encoding, by vendor and kind.",
            ["vendor", "kind"],
            registry=self.registry,
        )
        self.stored_records = Counter(
            "reductrai_stored_records",
            "Records committed to the store, by vendor and kind.",
            ["vendor", "kind"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "reductrai_rejected_requests",
            "Requests answered with an error before reaching the store, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.upstream_requests = Counter(
            "reductrai_upstream_requests",
            "Forwarded requests by upstream and outcome (the status class or an error).",
            ["upstream", "outcome"],
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "reductrai_upstream_latency_seconds",
            "Time from sending a request upstream to its whole response.",
            ["upstream"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )

        self.tls_handshake_failures = Counter(
            "reductrai_tls_handshake_failures",
            "TLS connections that ended in a TLS error before any request, by listener role.",
            ["role"],
            registry=self.registry,
        )
        self.tls_reloads = Counter(
            "reductrai_tls_reloads",
            "Reloads of the listeners' TLS certificates, by outcome (ok or error).",
            ["outcome"],
            registry=self.registry,
        )
        self.limits_hit = Counter(
            "reductrai_limits_hit",
            "Connections or requests refused by a limit, by listener role and limit.",
            ["role", "limit"],
            registry=self.registry,
        )
        self.connections_open = Gauge(
            "reductrai_connections_open",
            "Client connections open now, by listener role.",
            ["role"],
            registry=self.registry,
        )
        self.admin_auth_failures = Counter(
            "reductrai_admin_auth_failures",
            "Admin requests refused for want of a valid credential, by reason.",
            ["reason"],
            registry=self.registry,
        )

    def child(self, metric, *values: str):
        """
        Return C{metric.labels(*values)}, cached: prometheus_client checks
        and converts the label values on every C{labels} call, which the
        ingest path would otherwise pay several times per request.
        """
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def render(self) -> bytes:
        """
        Render every metric in the Prometheus text exposition format.
        """
        return generate_latest(self.registry)
