"""
Counters of what sampling forwarded and what it kept only in the local
store, per vendor, item kind and service.

Byte counts are decoded (content-encoding undone) bytes.  When the caller
passes the size of the thinned body, forwarded and dropped bytes of the
request are exact; their split among kinds and services is proportional
to item counts (an estimate: items of one request differ in size).
Without the thinned size, the request's bytes are split by item count.

The upstream volume saved is estimated twice: in decoded bytes (the
dropped bytes) and in wire bytes (the request's wire size times the
dropped fraction of its decoded bytes, which assumes the compression ratio
of the thinned body equals the original's).

Service names come from client payloads, so their number is capped per
vendor (L{MAX_SERVICES}); later services are counted as C{"_other"}.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Optional

from prometheus_client import CollectorRegistry, Counter

from reductrai.sampling.decision import Decision

#: Distinct service label values per vendor before folding into C{_other}.
MAX_SERVICES = 200
OTHER_SERVICE = "_other"


class SamplingCounters:
    """
    Count sampling outcomes; expose them as Prometheus metrics and as a
    plain dictionary.
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None, max_services: int = MAX_SERVICES) -> None:
        """
        @param registry: the daemon's registry (L{reductrai.metrics.Metrics.registry});
            L{None} keeps the counts in the dictionary only.
        @param max_services: distinct services per vendor before folding.
        """
        self._lock = threading.Lock()
        self._max_services = max_services
        self._services: dict[str, set[str]] = {}
        self._items: dict[tuple[str, str, str], dict[str, int]] = {}
        self._bytes: dict[tuple[str, str], dict[str, int]] = {}
        self._requests: dict[str, dict[str, int]] = {}
        self._saved_wire: dict[str, int] = {}
        self._prometheus = registry is not None
        if registry is not None:
            self.items_metric = Counter(
                "reductrai_sampling_items",
                "Items seen by sampling, by vendor, kind, service and outcome "
                "(forwarded, or dropped: kept only in the local store).",
                ["vendor", "kind", "service", "outcome"],
                registry=registry,
            )
            self.bytes_metric = Counter(
                "reductrai_sampling_decoded_bytes",
                "Decoded bytes by vendor, kind and outcome (forwarded or dropped); the split "
                "among kinds of one request is proportional to item counts.",
                ["vendor", "kind", "outcome"],
                registry=registry,
            )
            self.requests_metric = Counter(
                "reductrai_sampling_requests",
                "Requests by vendor and outcome: whole (forwarded unchanged), thinned, "
                "suppressed (nothing forwarded).",
                ["vendor", "outcome"],
                registry=registry,
            )
            self.saved_metric = Counter(
                "reductrai_sampling_saved_wire_bytes",
                "Estimated upstream wire bytes not sent because of sampling, by vendor.",
                ["vendor"],
                registry=registry,
            )

    def _service(self, vendor: str, service: str) -> str:
        known = self._services.setdefault(vendor, set())
        if service in known:
            return service
        if len(known) >= self._max_services:
            return OTHER_SERVICE
        known.add(service)
        return service

    def record(
        self,
        vendor: str,
        decision: Decision,
        decoded_bytes: int,
        forwarded_bytes: Optional[int] = None,
        wire_bytes: Optional[int] = None,
    ) -> None:
        """
        Count one request's decision.

        @param vendor: the vendor name.
        @param decision: what L{SamplingPolicy.decide} returned.
        @param decoded_bytes: the request's decoded body size.
        @param forwarded_bytes: the decoded size of what was sent upstream
            (the thinned body), when known; 0 when nothing was sent.
        @param wire_bytes: the request's body size as received, for the
            wire-bytes saving estimate.
        """
        forwarded_items = decision.forwarded_items
        dropped_items = decision.dropped_items
        total_items = forwarded_items + dropped_items
        if decision.keeps_all:
            outcome = "whole"
            forwarded_total = decoded_bytes
        elif not decision.forward_request:
            outcome = "suppressed"
            forwarded_total = 0
        else:
            outcome = "thinned"
            if forwarded_bytes is not None:
                forwarded_total = min(max(forwarded_bytes, 0), decoded_bytes)
            else:
                forwarded_total = decoded_bytes * forwarded_items // total_items if total_items else decoded_bytes
        dropped_total = decoded_bytes - forwarded_total
        saved_wire = 0
        if wire_bytes is not None and decoded_bytes:
            saved_wire = wire_bytes * dropped_total // decoded_bytes

        with self._lock:
            requests = self._requests.setdefault(vendor, {})
            requests[outcome] = requests.get(outcome, 0) + 1
            self._saved_wire[vendor] = self._saved_wire.get(vendor, 0) + saved_wire
            per_kind: dict[str, list[int]] = {}
            for outcome_name, counts in (("forwarded", decision.forwarded), ("dropped", decision.dropped)):
                for (kind, service), count in counts.items():
                    label = self._service(vendor, service)
                    entry = self._items.setdefault((vendor, kind, label), {"forwarded": 0, "dropped": 0})
                    entry[outcome_name] += count
                    if self._prometheus:
                        self.items_metric.labels(vendor, kind, label, outcome_name).inc(count)
                    totals = per_kind.setdefault(kind, [0, 0])
                    totals[0 if outcome_name == "forwarded" else 1] += count
            for kind, (kind_forwarded, kind_dropped) in per_kind.items():
                forwarded_share = forwarded_total * kind_forwarded // forwarded_items if forwarded_items else 0
                dropped_share = dropped_total * kind_dropped // dropped_items if dropped_items else 0
                entry = self._bytes.setdefault((vendor, kind), {"forwarded": 0, "dropped": 0})
                entry["forwarded"] += forwarded_share
                entry["dropped"] += dropped_share
                if self._prometheus:
                    self.bytes_metric.labels(vendor, kind, "forwarded").inc(forwarded_share)
                    self.bytes_metric.labels(vendor, kind, "dropped").inc(dropped_share)
            if self._prometheus:
                self.requests_metric.labels(vendor, outcome).inc()
                self.saved_metric.labels(vendor).inc(saved_wire)

    def snapshot(self) -> dict[str, Any]:
        """
        Return every count as plain JSON-ready data::

            {"items": {vendor: {kind: {service: {"received", "forwarded", "dropped"}}}},
             "bytes": {vendor: {kind: {"received", "forwarded", "dropped"}}},
             "requests": {vendor: {"whole", "thinned", "suppressed"}},
             "saved": {vendor: {"decoded_bytes", "wire_bytes"}},
             "totals": {"items_received", "items_forwarded", "items_dropped",
                        "bytes_forwarded", "bytes_dropped", "saved_wire_bytes"}}

        C{received} is C{forwarded + dropped}; C{dropped} items are kept
        only in the local store.
        """
        with self._lock:
            items: dict[str, Any] = {}
            totals = {
                "items_received": 0,
                "items_forwarded": 0,
                "items_dropped": 0,
                "bytes_forwarded": 0,
                "bytes_dropped": 0,
                "saved_wire_bytes": sum(self._saved_wire.values()),
            }
            for (vendor, kind, service), counts in sorted(self._items.items()):
                received = counts["forwarded"] + counts["dropped"]
                items.setdefault(vendor, {}).setdefault(kind, {})[service] = {"received": received, **counts}
                totals["items_received"] += received
                totals["items_forwarded"] += counts["forwarded"]
                totals["items_dropped"] += counts["dropped"]
            byte_counts: dict[str, Any] = {}
            saved: dict[str, Any] = {}
            for (vendor, kind), counts in sorted(self._bytes.items()):
                received = counts["forwarded"] + counts["dropped"]
                byte_counts.setdefault(vendor, {})[kind] = {"received": received, **counts}
                totals["bytes_forwarded"] += counts["forwarded"]
                totals["bytes_dropped"] += counts["dropped"]
                vendor_saved = saved.setdefault(vendor, {"decoded_bytes": 0, "wire_bytes": self._saved_wire.get(vendor, 0)})
                vendor_saved["decoded_bytes"] += counts["dropped"]
            requests = {vendor: dict(counts) for vendor, counts in sorted(self._requests.items())}
            return {"items": items, "bytes": byte_counts, "requests": requests, "saved": saved, "totals": totals}

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        """
        Add the counts of an earlier L{snapshot} (for example persisted
        before a restart) to the dictionary counts.  Prometheus counters
        are not changed: they restart from zero, as Prometheus expects.
        """
        with self._lock:
            for vendor, kinds in snapshot.get("items", {}).items():
                for kind, services in kinds.items():
                    for service, counts in services.items():
                        label = self._service(vendor, service)
                        entry = self._items.setdefault((vendor, kind, label), {"forwarded": 0, "dropped": 0})
                        entry["forwarded"] += int(counts.get("forwarded", 0))
                        entry["dropped"] += int(counts.get("dropped", 0))
            for vendor, kinds in snapshot.get("bytes", {}).items():
                for kind, counts in kinds.items():
                    entry = self._bytes.setdefault((vendor, kind), {"forwarded": 0, "dropped": 0})
                    entry["forwarded"] += int(counts.get("forwarded", 0))
                    entry["dropped"] += int(counts.get("dropped", 0))
            for vendor, counts in snapshot.get("requests", {}).items():
                requests = self._requests.setdefault(vendor, {})
                for outcome, count in counts.items():
                    requests[outcome] = requests.get(outcome, 0) + int(count)
            for vendor, counts in snapshot.get("saved", {}).items():
                self._saved_wire[vendor] = self._saved_wire.get(vendor, 0) + int(counts.get("wire_bytes", 0))
