"""
Thinning of OTLP/HTTP trace and log export requests, protobuf and
OTLP/JSON.

Item indexes are those of L{reductrai.formats.otlp}: every span (or log
record) in the walk of resources, then scopes, then records, rejected ones
included.  Kept records stay under their own resource and scope; a scope,
and then a resource, that loses all its records is removed.  OTLP/JSON is
edited as JSON (field spellings, hex ids and unknown fields are left as
sent).

The applied rate of a kept span is written in its W3C C{tracestate} as
the OpenTelemetry threshold C{ot=th:...} (OpenTelemetry "TraceState:
Probability Sampling"): the rejection threshold T out of 2^56, in hex with
trailing zeros removed, C{th:0} meaning 100%.  The proxy's decision is
independent of the randomness value that OpenTelemetry samplers read from
the trace id, so an existing threshold is combined by multiplying the
probabilities (as for independent samplers), and a downstream
consistent-probability sampler may find the threshold inconsistent with
the trace id's randomness; the adjusted count that the threshold conveys
(1 / probability) stays right.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from reductrai.formats.items import PayloadError
from reductrai.formats.otlp import LOGS, TRACES, is_json
from reductrai.sampling.jsontext import dumps_like, loads

_THRESHOLD_BITS = 56
_THRESHOLD_MAX = 1 << _THRESHOLD_BITS

#: (resource list, scope list, record list, trace state) names of each
#: signal, in OTLP/JSON camelCase and in proto snake_case.
_JSON_NAMES = {
    TRACES: (("resourceSpans", "resource_spans"), ("scopeSpans", "scope_spans"), ("spans",)),
    LOGS: (("resourceLogs", "resource_logs"), ("scopeLogs", "scope_logs"), ("logRecords", "log_records")),
}
_TRACE_STATE_NAMES = ("traceState", "trace_state")


def threshold_for(probability: float) -> int:
    """
    Return the OpenTelemetry rejection threshold for a sampling
    probability: C{2^56 - round(p * 2^56)}.
    """
    probability = min(max(probability, 0.0), 1.0)
    return _THRESHOLD_MAX - round(probability * _THRESHOLD_MAX)


def encode_threshold(threshold: int) -> str:
    """
    Encode a threshold as the C{th} value: 14 hex digits with trailing
    zeros removed, C{"0"} for zero.
    """
    if threshold <= 0:
        return "0"
    return format(threshold, "014x").rstrip("0")


def _decode_threshold(value: str) -> Optional[int]:
    if not 1 <= len(value) <= 14:
        return None
    try:
        return int(value.ljust(14, "0"), 16)
    except ValueError:
        return None


def with_sampling_rate(trace_state: str, rate: float) -> str:
    """
    Return a W3C C{tracestate} whose C{ot} entry carries the threshold of
    C{rate} combined with the threshold already there (probabilities
    multiplied).  The C{ot} entry moves to the front, as the W3C
    specification asks of a modified entry; other entries and other
    C{ot} sub-keys are kept.
    """
    members = [member.strip() for member in trace_state.split(",") if member.strip()]
    ot_value = ""
    others = []
    for member in members:
        key, _, value = member.partition("=")
        if key.strip() == "ot" and not ot_value:
            ot_value = value.strip()
        else:
            others.append(member)
    fields = [field for field in ot_value.split(";") if field]
    probability = rate
    rest = []
    for field in fields:
        name, _, value = field.partition(":")
        if name == "th":
            existing = _decode_threshold(value)
            if existing is not None:
                probability *= (_THRESHOLD_MAX - existing) / _THRESHOLD_MAX
            continue
        rest.append(field)
    ot = ";".join([f"th:{encode_threshold(threshold_for(probability))}"] + rest)
    return ",".join([f"ot={ot}"] + others)


def thin_protobuf(body: bytes, signal: str, keep: set[int], rates: Mapping[int, float]) -> Optional[bytes]:
    """
    Keep the spans or log records at C{keep} of a protobuf export request.
    """
    if signal == TRACES:
        request: Any = trace_service_pb2.ExportTraceServiceRequest()
    elif signal == LOGS:
        request = logs_service_pb2.ExportLogsServiceRequest()
    else:
        raise PayloadError("only OTLP traces and logs are thinned")
    try:
        request.ParseFromString(body)
    except (DecodeError, ValueError, RecursionError):
        raise PayloadError("invalid OTLP protobuf payload") from None
    if signal == TRACES:
        resources, scopes_of, records_of = request.resource_spans, (lambda r: r.scope_spans), (lambda s: s.spans)
    else:
        resources, scopes_of, records_of = request.resource_logs, (lambda r: r.scope_logs), (lambda s: s.log_records)
    index = 0
    kept_any = False
    plan = []
    for resource_position, resource in enumerate(resources):
        for scope_position, scope in enumerate(scopes_of(resource)):
            drop = []
            for record_position, record in enumerate(records_of(scope)):
                if index in keep:
                    kept_any = True
                    rate = rates.get(index)
                    if rate is not None and signal == TRACES:
                        record.trace_state = with_sampling_rate(record.trace_state, rate)
                else:
                    drop.append(record_position)
                index += 1
            plan.append((resource_position, scope_position, drop))
    if not kept_any:
        return None
    emptied_resources = set()
    for resource_position, scope_position, drop in reversed(plan):
        scopes = scopes_of(resources[resource_position])
        records = records_of(scopes[scope_position])
        if not drop:
            continue
        for record_position in reversed(drop):
            del records[record_position]
        if not records:
            del scopes[scope_position]
            emptied_resources.add(resource_position)
    for resource_position in sorted(emptied_resources, reverse=True):
        if not scopes_of(resources[resource_position]):
            del resources[resource_position]
    return request.SerializeToString()


def _field(mapping: Mapping[str, Any], names: tuple[str, ...]) -> Optional[str]:
    for name in names:
        if name in mapping:
            return name
    return None


def thin_json(body: bytes, signal: str, keep: set[int], rates: Mapping[int, float]) -> Optional[bytes]:
    """
    Keep the spans or log records at C{keep} of an OTLP/JSON export
    request.
    """
    if signal not in _JSON_NAMES:
        raise PayloadError("only OTLP traces and logs are thinned")
    document = loads(body)
    if not isinstance(document, dict):
        raise PayloadError("OTLP/JSON payload must be a JSON object")
    resource_names, scope_names, record_names = _JSON_NAMES[signal]
    resource_key = _field(document, resource_names)
    resources = document.get(resource_key, []) if resource_key else []
    index = 0
    kept_any = False
    new_resources = []
    for resource in resources if isinstance(resources, list) else []:
        if not isinstance(resource, dict):
            continue
        scope_key = _field(resource, scope_names)
        scopes = resource.get(scope_key) if scope_key else None
        if not isinstance(scopes, list) or not scopes:
            new_resources.append(resource)
            continue
        new_scopes = []
        for scope in scopes:
            record_key = _field(scope, record_names) if isinstance(scope, dict) else None
            records = scope.get(record_key) if record_key else None
            if not isinstance(records, list) or not records:
                new_scopes.append(scope)
                continue
            kept = []
            for record in records:
                if index in keep:
                    kept.append(record)
                    kept_any = True
                    rate = rates.get(index)
                    if rate is not None and signal == TRACES and isinstance(record, dict):
                        state_key = _field(record, _TRACE_STATE_NAMES) or "traceState"
                        current = record.get(state_key)
                        record[state_key] = with_sampling_rate(current if isinstance(current, str) else "", rate)
                index += 1
            if kept:
                new_scopes.append({**scope, record_key: kept})
        if new_scopes:
            new_resources.append({**resource, scope_key: new_scopes})
    if not kept_any:
        return None
    if resource_key:
        document[resource_key] = new_resources
    return dumps_like(document, body)


def thin(body: bytes, content_type: Optional[str], signal: str, keep: set[int], rates: Mapping[int, float]) -> Optional[bytes]:
    """
    Keep the items at C{keep} of an OTLP traces or logs request, in the
    request's own encoding.
    """
    if is_json(content_type):
        return thin_json(body, signal, keep, rates)
    return thin_protobuf(body, signal, keep, rates)
