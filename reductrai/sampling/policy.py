"""
The sampling policy: which items of a request are forwarded upstream in
C{sample} mode.  Every request is stored in full whatever is decided here;
sampling only changes what the vendor receives.

Rules by item kind:

  - Metrics, sketches, service checks, events and metadata are always
    forwarded in full.  Thinning metric points would corrupt what the
    vendor computes from them: counters and rates would be undercounted,
    percentiles of distributions and sketches skewed, and a series whose
    points are dropped looks like "no data", which fires (or silences)
    monitors.  No setting changes this.
  - Spans: the decision is a pure function of the trace id (the Datadog
    agent's rate sampler, see L{reductrai.sampling.decision}), so every
    span of a trace is kept or dropped together, across requests, vendors
    and proxy instances.  A trace with sampling priority 2 (user keep) on
    any of its spans in the request is kept; a trace with priority -1
    (user reject) is never forwarded.
  - Logs: a line at one of the always-kept levels is forwarded; a line
    with a trace id follows its trace (the same hash and threshold as the
    trace, at the log rate); other lines are decided by a stable hash of
    the configured key fields.
  - Unparsed bodies: forwarded whole, or (C{sampling.opaque = "sample"})
    whole requests of log and trace routes forwarded at random at the
    kind's rate.

Rates are looked up per kind: the item's service rate, else its vendor's
rate, else the kind's rate (C{sampling.trace_rate} or C{sampling.log_rate},
defaulting to C{proxy.sample_rate}).  With per-service rates, the hash
thresholds nest: a trace kept at the lowest rate among its services is
complete, and one kept only at a higher rate loses the spans of the
lower-rate services.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterable, Mapping, Optional

import attrs

from reductrai.config import ConfigError
from reductrai.formats.items import LOG, SPAN, Item, ParsedPayload
from reductrai.sampling.decision import (
    ALL,
    CountKey,
    Decision,
    keep_hash,
    keep_trace,
    key_hash,
    trace_id_low64,
)
from reductrai.sampling.settings import (
    DEFAULT_KEEP_LEVELS,
    DEFAULT_LOG_KEY_FIELDS,
    OPAQUE_CHOICES,
    SAMPLING_FIELDS,
)

__all__ = ["SAMPLING_FIELDS", "RateTable", "SamplingPolicy", "parse_rates"]

#: Route kinds (L{reductrai.vendors.base}) whose unparsed bodies may be
#: sampled whole.
_SAMPLED_ROUTE_KINDS = {"traces": SPAN, "logs": LOG}

#: Datadog sampling priorities with a fixed outcome.
PRIORITY_USER_KEEP = 2
PRIORITY_USER_REJECT = -1

#: Log key field names read from item attributes (C{timestamp} is
#: C{Item.timestamp_ns}); other names are tags.
_ITEM_FIELDS = {
    "service": "service",
    "host": "host",
    "message": "message",
    "timestamp": "timestamp_ns",
    "name": "name",
    "level": "level",
}


def _check_rate(value: Any, label: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{label}: invalid rate {value!r}; expected a number from 0 to 1")
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{label}: invalid rate {value!r}; expected a number from 0 to 1") from None
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"{label}: invalid rate {value!r}; expected a number from 0 to 1")
    return rate


def parse_rates(value: Any, label: str) -> dict[str, float]:
    """
    Read a per-vendor or per-service rate table.

    @param value: a mapping of name to rate (a TOML inline table), a list
        of C{"name:rate"} strings, or one comma-separated string of them.
        The name is what precedes the last colon.
    @param label: the setting's key, for error messages.
    @return: the rates by name.
    @raise ConfigError: an entry has no name or its rate is not a number
        from 0 to 1.
    """
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return {str(name): _check_rate(rate, f"{label}.{name}") for name, rate in value.items()}
    if isinstance(value, str):
        value = [part for part in value.split(",")]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{label}: expected name:rate entries")
    rates: dict[str, float] = {}
    for entry in value:
        if not isinstance(entry, str):
            raise ConfigError(f"{label}: invalid entry {entry!r}; expected name:rate")
        entry = entry.strip()
        if not entry:
            continue
        name, colon, rate = entry.rpartition(":")
        if not colon or not name.strip():
            raise ConfigError(f"{label}: invalid entry {entry!r}; expected name:rate")
        rates[name.strip()] = _check_rate(rate.strip(), f"{label} entry {name.strip()!r}")
    return rates


@attrs.frozen
class RateTable:
    """
    The rates of one item kind.

    @ivar default: the kind's rate.
    @ivar vendors: rates by vendor name.
    @ivar services: rates by service name (win over vendor rates).
    """

    default: float
    vendors: Mapping[str, float] = attrs.field(factory=dict)
    services: Mapping[str, float] = attrs.field(factory=dict)

    def rate(self, vendor: str, service: Optional[str]) -> float:
        """
        Return the rate for an item of C{service} received for C{vendor}.
        """
        if service is not None and service in self.services:
            return self.services[service]
        return self.vendors.get(vendor, self.default)


def _setting(settings: Any, key: str, default: Any) -> Any:
    try:
        return settings[key]
    except KeyError:
        return default


class SamplingPolicy:
    """
    Decide which items of a request are forwarded (see the module
    docstring for the rules).

    A policy holds no mutable state besides its random source (used only
    for whole-request sampling of unparsed bodies), so one instance may
    serve every request.
    """

    def __init__(
        self,
        traces: RateTable,
        logs: RateTable,
        keep_levels: Iterable[str] = DEFAULT_KEEP_LEVELS,
        log_key_fields: Iterable[str] = DEFAULT_LOG_KEY_FIELDS,
        opaque: str = "forward",
        record_rate: bool = True,
        random_source: Optional[Callable[[], float]] = None,
    ) -> None:
        """
        @param traces: the span rates.
        @param logs: the log rates.
        @param keep_levels: lower-case levels always forwarded.
        @param log_key_fields: fields hashed for log lines without a trace
            id (item attributes, else tag names).
        @param opaque: C{"forward"} or C{"sample"} (see the module
            docstring).
        @param record_rate: whether L{Decision.rates} is filled, so that
            thinning records the applied rate in the payload.
        @param random_source: returns floats in [0, 1) for whole-request
            sampling; L{random.random} by default.
        """
        if opaque not in OPAQUE_CHOICES:
            raise ValueError(f"opaque must be one of {OPAQUE_CHOICES}")
        self.traces = traces
        self.logs = logs
        self.keep_levels = frozenset(level.strip().lower() for level in keep_levels)
        self.log_key_fields = tuple(log_key_fields)
        self.opaque = opaque
        self.record_rate = record_rate
        self._random = random_source or random.random

    @classmethod
    def from_settings(cls, settings: Any, random_source: Optional[Callable[[], float]] = None) -> "SamplingPolicy":
        """
        Build a policy from the resolved settings (a L{reductrai.config.Settings}
        or any mapping by C{"section.name"}); keys of L{SAMPLING_FIELDS}
        that are missing take their defaults.

        @raise ConfigError: a rate or a rate table is invalid.
        """
        default_rate = _check_rate(_setting(settings, "proxy.sample_rate", 0.1), "proxy.sample_rate")

        def kind_rate(key: str) -> float:
            value = _setting(settings, key, "")
            if value is None or (isinstance(value, str) and not value.strip()):
                return default_rate
            return _check_rate(value, key)

        traces = RateTable(
            kind_rate("sampling.trace_rate"),
            parse_rates(_setting(settings, "sampling.trace_vendor_rates", []), "sampling.trace_vendor_rates"),
            parse_rates(_setting(settings, "sampling.trace_service_rates", []), "sampling.trace_service_rates"),
        )
        logs = RateTable(
            kind_rate("sampling.log_rate"),
            parse_rates(_setting(settings, "sampling.log_vendor_rates", []), "sampling.log_vendor_rates"),
            parse_rates(_setting(settings, "sampling.log_service_rates", []), "sampling.log_service_rates"),
        )
        opaque = _setting(settings, "sampling.opaque", "forward") or "forward"
        if opaque not in OPAQUE_CHOICES:
            raise ConfigError(f"sampling.opaque: invalid value {opaque!r}; allowed: {', '.join(OPAQUE_CHOICES)}")
        return cls(
            traces=traces,
            logs=logs,
            keep_levels=_setting(settings, "sampling.keep_levels", DEFAULT_KEEP_LEVELS),
            log_key_fields=_setting(settings, "sampling.log_key_fields", DEFAULT_LOG_KEY_FIELDS),
            opaque=opaque,
            record_rate=bool(_setting(settings, "sampling.record_rate", True)),
            random_source=random_source,
        )

    def decide(self, vendor: str, route_kind: str, parsed: Optional[ParsedPayload]) -> Decision:
        """
        Decide what to forward of one request.

        @param vendor: the vendor name (C{"datadog"}, C{"otlp"}, ...); it
            selects per-vendor rates.
        @param route_kind: the route's kind (L{reductrai.vendors.base}:
            C{"metrics"}, C{"logs"}, C{"traces"}, ...); used only when
            C{parsed} is L{None}.
        @param parsed: the request's items, or L{None} when the body was
            not parsed (no parser for the route, or a parse error).
        @return: the decision.  C{keep_indexes} is L{ALL} when the request
            is forwarded unchanged; otherwise the indexes to keep (empty:
            send nothing).  Items that the parser rejected
            (L{ParsedPayload.rejected}) are not forwarded when the payload
            is thinned.
        """
        if parsed is None:
            return self._decide_opaque(vendor, route_kind)

        forwarded: dict[CountKey, int] = {}
        dropped: dict[CountKey, int] = {}
        rates: dict[int, float] = {}
        keep: set[int] = set()
        trace_priority = self._trace_priorities(parsed.items)

        for item in parsed.items:
            kept, rate = self._decide_item(vendor, item, trace_priority)
            key = (item.kind, item.service or "")
            if kept:
                keep.add(item.index)
                forwarded[key] = forwarded.get(key, 0) + 1
                if rate is not None and rate < 1.0 and self.record_rate and item.kind == SPAN:
                    rates[item.index] = rate
            else:
                dropped[key] = dropped.get(key, 0) + 1

        if not dropped and not rates:
            return Decision(ALL, forwarded, dropped, {}, "all")
        return Decision(frozenset(keep), forwarded, dropped, rates, "thinned" if keep else "none")

    def _decide_opaque(self, vendor: str, route_kind: str) -> Decision:
        kind = _SAMPLED_ROUTE_KINDS.get(route_kind)
        key = (route_kind, "")
        if self.opaque != "sample" or kind is None:
            return Decision(ALL, {key: 1}, {}, {}, "opaque")
        table = self.traces if kind == SPAN else self.logs
        rate = table.rate(vendor, None)
        if rate >= 1.0 or self._random() < rate:
            return Decision(ALL, {key: 1}, {}, {}, "opaque")
        return Decision(frozenset(), {}, {key: 1}, {}, "opaque")

    @staticmethod
    def _trace_priorities(items: Iterable[Item]) -> dict[str, int]:
        """
        Return the fixed outcome of traces whose spans carry a user
        priority: C{2} when any span says user keep, else C{-1} when any
        says user reject.
        """
        priorities: dict[str, int] = {}
        for item in items:
            if item.kind != SPAN or item.trace_id is None or item.sampling_priority is None:
                continue
            if item.sampling_priority >= PRIORITY_USER_KEEP:
                priorities[item.trace_id] = PRIORITY_USER_KEEP
            elif item.sampling_priority <= PRIORITY_USER_REJECT:
                priorities.setdefault(item.trace_id, PRIORITY_USER_REJECT)
        return priorities

    def _decide_item(self, vendor: str, item: Item, trace_priority: Mapping[str, int]) -> tuple[bool, Optional[float]]:
        """
        Return whether to forward C{item} and, when it was kept by rate,
        the rate.
        """
        if item.kind == SPAN:
            return self._decide_span(vendor, item, trace_priority)
        if item.kind == LOG:
            return self._decide_log(vendor, item)
        return True, None

    def _decide_span(self, vendor: str, item: Item, trace_priority: Mapping[str, int]) -> tuple[bool, Optional[float]]:
        if item.trace_id is not None:
            fixed = trace_priority.get(item.trace_id)
            if fixed == PRIORITY_USER_KEEP:
                return True, None
            if fixed == PRIORITY_USER_REJECT:
                return False, None
        elif item.sampling_priority is not None:
            if item.sampling_priority >= PRIORITY_USER_KEEP:
                return True, None
            if item.sampling_priority <= PRIORITY_USER_REJECT:
                return False, None
        rate = self.traces.rate(vendor, item.service)
        low = trace_id_low64(item.trace_id) if item.trace_id is not None else None
        if low is None:
            # A span without a trace id cannot be matched with the rest of
            # its trace; forwarding it is the only choice that loses nothing.
            return True, None
        if rate >= 1.0:
            return True, None
        return keep_trace(low, rate), rate

    def _decide_log(self, vendor: str, item: Item) -> tuple[bool, Optional[float]]:
        if item.level is not None and item.level.strip().lower() in self.keep_levels:
            return True, None
        rate = self.logs.rate(vendor, item.service)
        if rate >= 1.0:
            return True, None
        low = trace_id_low64(item.trace_id) if item.trace_id is not None else None
        if low is not None:
            return keep_trace(low, rate), rate
        return keep_hash(key_hash(self._log_key(item)), rate), rate

    def _log_key(self, item: Item) -> list[str]:
        parts = []
        for field in self.log_key_fields:
            if field in _ITEM_FIELDS:
                value = getattr(item, _ITEM_FIELDS[field])
            else:
                value = item.tags.get(field)
            parts.append("" if value is None else str(value))
        return parts
