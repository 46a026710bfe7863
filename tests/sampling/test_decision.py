"""
Tests for trace and log keep decisions: agreement with the Datadog
formula, consistency across requests and instances, kept fraction,
priorities, levels and kinds that are never thinned.
"""

from __future__ import annotations

import math
import random

import pytest

from reductrai.config import ConfigError
from reductrai.formats.items import EVENT, LOG, METADATA, METRIC, SERVICE_CHECK, SKETCH, SPAN, Item, ParsedPayload
from reductrai.sampling import ALL, SamplingPolicy
from reductrai.sampling.decision import keep_trace, trace_id_low64
from reductrai.sampling.policy import parse_rates


def datadog_formula(trace_id: int, rate: float) -> bool:
    """
    The trace agent's SampleByRate written independently with big ints:
    keep iff (low64 * 1111111111111111111) mod 2**64 < uint64(rate * float64(2**64 - 1)).
    """
    if rate >= 1:
        return True
    product = ((trace_id % 2**64) * 1111111111111111111) % 2**64
    return product < int(rate * float(2**64 - 1))


def policy(rate: float, **settings) -> SamplingPolicy:
    return SamplingPolicy.from_settings({"proxy.sample_rate": rate, **settings})


def span(index: int, trace_id: int, service: str = "svc", priority=None) -> Item:
    return Item(kind=SPAN, index=index, service=service, trace_id=format(trace_id, "032x"), sampling_priority=priority)


def test_datadog_agreement() -> None:
    """
    Decisions equal the formula for random 64- and 128-bit ids, edge ids
    and several rates.
    """
    generator = random.Random(20261204)
    ids = [1, 2, 2**63, 2**64 - 1, 12345678901234567890]
    ids += [generator.getrandbits(64) for _ in range(300)] + [generator.getrandbits(128) for _ in range(300)]
    for rate in (0.0, 0.001, 0.1, 0.25, 0.5, 0.9, 0.999, 1.0):
        for trace_id in ids:
            low = trace_id_low64(format(trace_id, "032x"))
            assert keep_trace(low, rate) == datadog_formula(trace_id, rate), (trace_id, rate)


def test_datadog_agreement_through_policy() -> None:
    """
    The policy's span decision is the formula on the low 64 bits.
    """
    generator = random.Random(7)
    ids = [generator.getrandbits(128) | 1 for _ in range(500)]
    parsed = ParsedPayload([span(position, trace_id) for position, trace_id in enumerate(ids)])
    decision = policy(0.3).decide("otlp", "traces", parsed)
    expected = {position for position, trace_id in enumerate(ids) if datadog_formula(trace_id, 0.3)}
    assert set(decision.keep_indexes) == expected


def test_trace_consistency_across_requests_and_instances() -> None:
    """
    Spans of one trace spread over many requests and two independent
    policies are kept or dropped together.
    """
    generator = random.Random(99)
    traces = [generator.getrandbits(128) | 1 for _ in range(400)]
    spans = [(trace_id, n) for trace_id in traces for n in range(5)]
    generator.shuffle(spans)
    first, second = policy(0.2), policy(0.2)
    outcomes: dict[int, set[bool]] = {}
    for start in range(0, len(spans), 37):
        batch = spans[start : start + 37]
        parsed = ParsedPayload([span(position, trace_id) for position, (trace_id, _) in enumerate(batch)])
        for instance in (first, second):
            decision = instance.decide("datadog", "traces", parsed)
            for position, (trace_id, _) in enumerate(batch):
                outcomes.setdefault(trace_id, set()).add(position in decision.keep_indexes)
    assert all(len(seen) == 1 for seen in outcomes.values())
    assert any(seen == {True} for seen in outcomes.values())
    assert any(seen == {False} for seen in outcomes.values())


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5])
def test_kept_fraction(rate: float) -> None:
    """
    Over 10,000 random trace ids the kept count is within 4.5 binomial
    standard deviations of n * rate (a false failure chance below 1e-5).
    """
    n = 10_000
    generator = random.Random(int(rate * 1000))
    kept = sum(keep_trace(generator.getrandbits(64), rate) for _ in range(n))
    tolerance = 4.5 * math.sqrt(n * rate * (1 - rate))
    assert abs(kept - n * rate) <= tolerance


def test_priorities() -> None:
    """
    User keep (2) on any span keeps the whole trace even at rate 0; user
    reject (-1) drops the whole trace even at rate 1.
    """
    parsed = ParsedPayload([span(0, 5, priority=2), span(1, 5), span(2, 6, priority=-1), span(3, 6), span(4, 7)])
    at_zero = policy(0.0).decide("datadog", "traces", parsed)
    assert set(at_zero.keep_indexes) == {0, 1}
    at_one = policy(1.0).decide("datadog", "traces", parsed)
    assert set(at_one.keep_indexes) == {0, 1, 4}


def test_error_logs_never_dropped() -> None:
    levels = ["error", "critical", "fatal", "warn", "warning", "emergency", "alert"]
    items = [Item(kind=LOG, index=position, level=level, message=f"m{position}") for position, level in enumerate(levels)]
    items += [Item(kind=LOG, index=len(items) + n, level="info", message=f"info {n}") for n in range(50)]
    decision = policy(0.0).decide("datadog", "logs", ParsedPayload(items))
    assert set(decision.keep_indexes) == set(range(len(levels)))


def test_logs_follow_their_trace() -> None:
    """
    A log line with a trace id is kept exactly when its trace is.
    """
    generator = random.Random(3)
    traces = [generator.getrandbits(128) | 1 for _ in range(300)]
    items = [Item(kind=LOG, index=n, level="info", trace_id=format(t, "032x")) for n, t in enumerate(traces)]
    decision = policy(0.25).decide("otlp", "logs", ParsedPayload(items))
    expected = {n for n, t in enumerate(traces) if datadog_formula(t, 0.25)}
    assert set(decision.keep_indexes) == expected


def test_log_key_is_stable() -> None:
    """
    Logs without a trace id are decided by their key: the same line gets
    the same decision in another request and another instance.
    """
    lines = [Item(kind=LOG, index=n, service="api", host="h1", timestamp_ns=n * 1000, message=f"line {n}") for n in range(400)]
    first = policy(0.3).decide("loki", "logs", ParsedPayload(lines))
    shifted = [Item(kind=LOG, index=n, service=i.service, host=i.host, timestamp_ns=i.timestamp_ns, message=i.message) for n, i in enumerate(reversed(lines))]
    second = policy(0.3).decide("loki", "logs", ParsedPayload(shifted))
    kept_first = {lines[n].message for n in first.keep_indexes}
    kept_second = {shifted[n].message for n in second.keep_indexes}
    assert kept_first == kept_second
    assert 0 < len(kept_first) < len(lines)


@pytest.mark.parametrize("kind", [METRIC, SKETCH, EVENT, SERVICE_CHECK, METADATA])
def test_never_thinned_kinds(kind: str) -> None:
    items = [Item(kind=kind, index=n, service="s", level="info") for n in range(20)]
    decision = policy(0.0).decide("datadog", "metrics", ParsedPayload(items))
    assert decision.keep_indexes is ALL
    assert decision.dropped_items == 0
    assert decision.forwarded == {(kind, "s"): 20}


def test_rate_tables() -> None:
    sampling = policy(
        0.1,
        **{
            "sampling.trace_vendor_rates": ["datadog:0.5"],
            "sampling.trace_service_rates": "checkout:1,ns:batch:0",
            "sampling.log_rate": "0.2",
        },
    )
    assert sampling.traces.rate("datadog", "other") == 0.5
    assert sampling.traces.rate("otlp", "other") == 0.1
    assert sampling.traces.rate("otlp", "checkout") == 1.0
    assert sampling.traces.rate("datadog", "ns:batch") == 0.0
    assert sampling.logs.rate("datadog", None) == 0.2
    assert parse_rates({"a": 0.3}, "x") == {"a": 0.3}
    for bad in (["datadog"], ["datadog:2"], ["datadog:x"], [":0.5"]):
        with pytest.raises(ConfigError):
            parse_rates(bad, "sampling.trace_vendor_rates")


def test_opaque_bodies() -> None:
    forward = policy(0.0).decide("datadog", "logs", None)
    assert forward.keep_indexes is ALL
    draws = iter([0.05, 0.5])
    sampling = SamplingPolicy.from_settings(
        {"proxy.sample_rate": 0.1, "sampling.opaque": "sample"}, random_source=lambda: next(draws)
    )
    assert sampling.decide("datadog", "logs", None).keep_indexes is ALL
    assert not sampling.decide("datadog", "logs", None).forward_request
    assert sampling.decide("datadog", "metrics", None).keep_indexes is ALL
