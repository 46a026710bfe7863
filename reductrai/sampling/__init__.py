"""
Sampling: forward a sample of logs and traces upstream, store everything.

The accept path calls, for a request whose body it parsed (or not):

    decision = policy.decide(vendor, route.kind, parsed)   # SamplingPolicy
    if decision.keeps_all:       forward the request as received
    elif not decision.forward_request:   send nothing
    else:
        body = thin_payload(vendor, route.name, context, decoded, parsed,
                            decision.keep_indexes, decision.rates)
        send reencode(body, content_encoding) with the original headers
        (Content-Length recomputed)
    counters.record(vendor, decision, len(decoded), len(body), len(wire))

Metrics, sketches, service checks, events and metadata are never thinned
(see L{reductrai.sampling.policy}).  The names below are loaded on first
use, so that C{reductrai.config} may import L{reductrai.sampling.settings}
without importing the parsers.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "ALL": "reductrai.sampling.decision",
    "Decision": "reductrai.sampling.decision",
    "keep_trace": "reductrai.sampling.decision",
    "SamplingPolicy": "reductrai.sampling.policy",
    "RateTable": "reductrai.sampling.policy",
    "SAMPLING_FIELDS": "reductrai.sampling.settings",
    "thin_payload": "reductrai.sampling.thinning",
    "reencode": "reductrai.sampling.thinning",
    "payload_format": "reductrai.sampling.thinning",
    "UnsupportedPayload": "reductrai.sampling.thinning",
    "SamplingCounters": "reductrai.sampling.counters",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'reductrai.sampling' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
