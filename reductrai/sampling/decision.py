"""
Keep-or-drop decisions for single items, and the L{Decision} of a request.

Every decision here is a pure function of its inputs, so two proxies (or
one proxy before and after a restart) with the same rates decide the same
way for the same trace, the same log line and the same retried request.

Traces use the Datadog trace agent's rate sampler.  Its reference is
C{SampleByRate} in DataDog/datadog-agent C{pkg/trace/sampler/sampler.go}
(the same code as C{sampleByRate} in dd-trace-go
C{ddtrace/tracer/sampler.go}, whose comment says it "has to be the same as
the Trace Agent")::

    maxTraceIDFloat = float64(^uint64(0))      // 2^64 - 1, rounds to 2^64
    samplerHasher   = uint64(1111111111111111111)
    if rate < 1 { return traceID*samplerHasher < uint64(rate*maxTraceIDFloat) }
    return true

C{traceID} is the low 64 bits of the trace id and the product wraps modulo
2^64.  dd-trace-py's C{RateSampler} differs in two details (it reduces modulo
C{2^64 - 1} and compares with C{<=}); the agent is followed here because it
is the component whose decisions a proxy in front of the intake must agree
with ("Has to be the same factor and key as the Agent to allow chained
sampling", dd-trace-py C{ddtrace/sampler.py}).

A 128-bit trace id (OTLP, W3C, Zipkin, New Relic, Datadog with
C{_dd.p.tid}) is reduced to its low 64 bits, as Datadog's own OTLP ingest
does when it converts OTLP trace ids to Datadog ones.
"""

from __future__ import annotations

import hashlib
from typing import AbstractSet, Iterable, Mapping, Optional, Union

import attrs

#: Knuth's multiplicative hashing factor used by every Datadog sampler.
KNUTH_FACTOR = 1111111111111111111

_UINT64_MASK = (1 << 64) - 1
#: C{float64(2^64 - 1)} as Go computes it: the nearest double, 2^64.
_MAX_TRACE_ID_FLOAT = float(_UINT64_MASK)


class _AllItems:
    """
    The set of every item index: the whole payload is kept.  It supports
    membership tests and is true; it cannot be enumerated.
    """

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int)

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "ALL"

    def __reduce__(self) -> str:
        return "ALL"


#: Keep every item (nothing to thin; forward the request as received).
ALL = _AllItems()

KeepSet = Union[AbstractSet[int], _AllItems]


def rate_threshold(rate: float) -> int:
    """
    Return the Datadog rate sampler's threshold for C{rate}:
    C{uint64(rate * float64(2^64 - 1))}, or C{2^64} for rates of 1 and more
    (every hash is below it).

    @param rate: the fraction to keep, 0 to 1.
    """
    if rate >= 1.0:
        return 1 << 64
    if rate <= 0.0:
        return 0
    return int(rate * _MAX_TRACE_ID_FLOAT)


def knuth_hash(value: int) -> int:
    """
    Return C{value * 1111111111111111111 mod 2^64}, Datadog's sampling hash.

    @param value: an unsigned 64-bit id (wider values are reduced to their
        low 64 bits first).
    """
    return ((value & _UINT64_MASK) * KNUTH_FACTOR) & _UINT64_MASK


def trace_id_low64(trace_id: str) -> Optional[int]:
    """
    Return the low 64 bits of a hex trace id (an L{Item.trace_id}).

    @param trace_id: up to 32 hex digits.
    @return: the low 64 bits, or L{None} when C{trace_id} is not hex or is
        zero (no trace).
    """
    try:
        value = int(trace_id, 16)
    except ValueError:
        return None
    if value == 0:
        return None
    return value & _UINT64_MASK


def keep_trace(trace_id_low: int, rate: float) -> bool:
    """
    Decide a trace the way the Datadog trace agent's C{SampleByRate} does.

    @param trace_id_low: the trace id's low 64 bits.
    @param rate: the fraction to keep, 0 to 1.
    @return: whether every span (and log) of the trace is kept.
    """
    if rate >= 1.0:
        return True
    return knuth_hash(trace_id_low) < rate_threshold(rate)


def key_hash(parts: Iterable[str]) -> int:
    """
    Return a stable 64-bit hash of a sequence of strings (BLAKE2b, 8 bytes,
    big-endian), the same in every process and on every platform.

    @param parts: the key's fields, in order; each is length-prefixed so
        that C{("ab", "c")} and C{("a", "bc")} differ.
    """
    digest = hashlib.blake2b(digest_size=8, person=b"reductrai-log")
    for part in parts:
        encoded = part.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(4, "big"))
        digest.update(encoded)
    return int.from_bytes(digest.digest(), "big")


def keep_hash(value: int, rate: float) -> bool:
    """
    Decide an item from a uniformly distributed 64-bit hash: keep it when
    the hash is below the rate's threshold (the comparison
    L{keep_trace} makes, without the Knuth step).

    @param value: a 64-bit hash (L{key_hash}).
    @param rate: the fraction to keep, 0 to 1.
    """
    if rate >= 1.0:
        return True
    return value < rate_threshold(rate)


#: Keys of L{Decision.forwarded} and L{Decision.dropped}: item kind and
#: service (the empty string when the item names none).
CountKey = tuple[str, str]


@attrs.frozen
class Decision:
    """
    What to forward of one request.

    @ivar keep_indexes: the L{Item.index} values to forward, or L{ALL} when
        the request is forwarded as received (no thinning).
    @ivar forwarded: items forwarded, by (kind, service).
    @ivar dropped: items kept only in the local store, by (kind, service).
    @ivar rates: for items kept by rate sampling at a rate below 1, the
        rate, by item index (what L{thin_payload} records in the payload,
        Datadog C{_sample_rate} or OTLP C{ot=th}).  Items kept for their
        level, priority or kind are not in it.
    @ivar reason: why the request is forwarded or not, for logs: C{"all"}
        (every item kept), C{"thinned"}, C{"none"} (nothing kept),
        C{"opaque"} (an unparsed body forwarded or sampled whole).
    """

    keep_indexes: KeepSet
    forwarded: Mapping[CountKey, int] = attrs.field(factory=dict)
    dropped: Mapping[CountKey, int] = attrs.field(factory=dict)
    rates: Mapping[int, float] = attrs.field(factory=dict)
    reason: str = "all"

    @property
    def keeps_all(self) -> bool:
        """
        Whether the request goes upstream unchanged.
        """
        return self.keep_indexes is ALL

    @property
    def forward_request(self) -> bool:
        """
        Whether anything is to be sent upstream.
        """
        return self.keep_indexes is ALL or bool(self.keep_indexes)

    @property
    def forwarded_items(self) -> int:
        return sum(self.forwarded.values())

    @property
    def dropped_items(self) -> int:
        return sum(self.dropped.values())
