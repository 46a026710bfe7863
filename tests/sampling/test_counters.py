"""
Tests for the sampling counters: dictionary snapshot and Prometheus
exposition.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from reductrai.sampling import ALL, Decision, SamplingCounters


def test_counts_and_prometheus() -> None:
    registry = CollectorRegistry()
    counters = SamplingCounters(registry)
    thinned = Decision(frozenset({0}), {("log", "api"): 1}, {("log", "api"): 3}, {}, "thinned")
    counters.record("datadog", thinned, decoded_bytes=1000, forwarded_bytes=250, wire_bytes=400)
    counters.record("datadog", Decision(ALL, {("metric", ""): 5}), decoded_bytes=500)
    counters.record("loki", Decision(frozenset(), {}, {("log", "x"): 2}, {}, "none"), decoded_bytes=80, wire_bytes=80)

    snapshot = counters.snapshot()
    assert snapshot["items"]["datadog"]["log"]["api"] == {"received": 4, "forwarded": 1, "dropped": 3}
    assert snapshot["bytes"]["datadog"]["log"] == {"received": 1000, "forwarded": 250, "dropped": 750}
    assert snapshot["bytes"]["datadog"]["metric"]["forwarded"] == 500
    assert snapshot["requests"] == {"datadog": {"thinned": 1, "whole": 1}, "loki": {"suppressed": 1}}
    # 750 of 1000 decoded bytes dropped from a 400-byte wire body: 300 saved.
    assert snapshot["saved"]["datadog"] == {"decoded_bytes": 750, "wire_bytes": 300}
    assert snapshot["totals"]["items_dropped"] == 5
    assert snapshot["totals"]["saved_wire_bytes"] == 300 + 80

    value = registry.get_sample_value
    assert value("reductrai_sampling_items_total", {"vendor": "datadog", "kind": "log", "service": "api", "outcome": "dropped"}) == 3
    assert value("reductrai_sampling_decoded_bytes_total", {"vendor": "datadog", "kind": "log", "outcome": "forwarded"}) == 250
    assert value("reductrai_sampling_requests_total", {"vendor": "loki", "outcome": "suppressed"}) == 1
    assert value("reductrai_sampling_saved_wire_bytes_total", {"vendor": "datadog"}) == 300

    restored = SamplingCounters()
    restored.restore(snapshot)
    restored.restore(snapshot)
    again = restored.snapshot()
    assert again["items"]["datadog"]["log"]["api"]["dropped"] == 6
    assert again["saved"]["datadog"]["wire_bytes"] == 600


def test_service_labels_are_capped() -> None:
    counters = SamplingCounters(CollectorRegistry(), max_services=2)
    for service in ("a", "b", "c", "d"):
        counters.record("otlp", Decision(ALL, {("span", service): 1}), decoded_bytes=10)
    services = counters.snapshot()["items"]["otlp"]["span"]
    assert set(services) == {"a", "b", "_other"}
    assert services["_other"]["forwarded"] == 2
