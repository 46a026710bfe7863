"""
Thinning of Datadog payloads: intake logs (C{/api/v2/logs}, C{/v1/input})
and trace payloads (the agent's protobuf C{AgentPayload} on
C{/api/v0.2/traces}, tracer msgpack/JSON v0.3/v0.4 and msgpack v0.5).

Item indexes are the ones L{reductrai.formats.datadog} and
L{reductrai.formats.datadog_agent} give: a log's position in the array
(or the non-empty line of a text body), a span's position in the walk of
tracer payloads, chunks and spans (or traces and spans).

The applied rate is recorded the way the trace agent records its own
samplers' rates (C{AddGlobalRate} in DataDog/datadog-agent
C{pkg/trace/sampler}): the C{_sample_rate} metric of the trace's root span
is multiplied by it.  Only root spans (parent id 0) present in the payload
are changed.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import msgpack
from google.protobuf.message import DecodeError

from reductrai.formats.items import PayloadError
from reductrai.proto import datadog_trace_pb2
from reductrai.sampling.jsontext import decode_text, dumps_like, loads, thin_array

#: The root-span metric holding the trace's cumulative sample rate.
SAMPLE_RATE_METRIC = "_sample_rate"


def _media_type(content_type: Optional[str]) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def thin_logs(body: bytes, content_type: Optional[str], keep: set[int]) -> Optional[bytes]:
    """
    Keep the logs at C{keep} of a C{/api/v2/logs} or C{/v1/input} body.

    @return: the thinned body, or L{None} when nothing is kept.
    """
    if _media_type(content_type) == "text/plain":
        lines = [line for line in decode_text(body).splitlines() if line.strip()]
        kept = [line for position, line in enumerate(lines) if position in keep]
        if not kept:
            return None
        return ("\n".join(kept) + "\n").encode("utf-8")
    text = decode_text(body)
    if text.lstrip().startswith("["):
        return thin_array(text, keep).encode("utf-8")
    return body if 0 in keep else None


def _scaled(metrics: Mapping[Any, float], key: Any, rate: float) -> float:
    current = metrics.get(key, 1.0)
    return float(current) * rate


def thin_agent_payload(body: bytes, keep: set[int], rates: Mapping[int, float]) -> Optional[bytes]:
    """
    Keep the spans at C{keep} of a protobuf C{AgentPayload}, removing
    chunks and tracer payloads left without spans.
    """
    payload = datadog_trace_pb2.AgentPayload()
    try:
        payload.ParseFromString(body)
    except (DecodeError, ValueError, RecursionError):
        raise PayloadError("invalid AgentPayload protobuf payload") from None
    index = 0
    kept_any = False
    had_chunks = [len(tracer.chunks) > 0 for tracer in payload.tracerPayloads]
    # Walk in wire order to number the spans, then delete from the end so
    # that the positions still to delete stay valid.
    plan: list[tuple[int, int, list[int]]] = []
    for tracer_position, tracer in enumerate(payload.tracerPayloads):
        for chunk_position, chunk in enumerate(tracer.chunks):
            drop = []
            for span_position, span in enumerate(chunk.spans):
                if index in keep:
                    kept_any = True
                    rate = rates.get(index)
                    if rate is not None and span.parentID == 0:
                        span.metrics[SAMPLE_RATE_METRIC] = _scaled(span.metrics, SAMPLE_RATE_METRIC, rate)
                else:
                    drop.append(span_position)
                index += 1
            plan.append((tracer_position, chunk_position, drop))
    if not kept_any:
        return None
    for tracer_position, chunk_position, drop in reversed(plan):
        chunk = payload.tracerPayloads[tracer_position].chunks[chunk_position]
        had_spans = len(chunk.spans) > 0
        for span_position in reversed(drop):
            del chunk.spans[span_position]
        if had_spans and not chunk.spans:
            del payload.tracerPayloads[tracer_position].chunks[chunk_position]
    for tracer_position in range(len(payload.tracerPayloads) - 1, -1, -1):
        if had_chunks[tracer_position] and not payload.tracerPayloads[tracer_position].chunks:
            del payload.tracerPayloads[tracer_position]
    return payload.SerializeToString()


def _unpack(body: bytes) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False, unicode_errors="surrogateescape")
    except Exception:
        # msgpack signals bad input with many exception types.
        raise PayloadError("invalid msgpack payload") from None


def _pack(document: Any) -> bytes:
    return msgpack.packb(document, use_bin_type=True, unicode_errors="surrogateescape")


def _thin_traces(traces: list[Any], keep: set[int], rates: Mapping[int, float], root: Any) -> tuple[list[Any], bool]:
    """
    Filter an array of traces (arrays of spans); C{root(span, rate)}
    records the rate on a root span.
    """
    index = 0
    kept_any = False
    result = []
    for trace in traces:
        kept = []
        for span in trace:
            if index in keep:
                kept.append(span)
                kept_any = True
                rate = rates.get(index)
                if rate is not None:
                    root(span, rate)
            index += 1
        if kept or not trace:
            result.append(kept)
    return result, kept_any


def _record_v04(span: Any, rate: float) -> None:
    if not isinstance(span, dict) or span.get("parent_id") not in (0, None):
        return
    metrics = span.get("metrics")
    if not isinstance(metrics, dict):
        metrics = {}
        span["metrics"] = metrics
    metrics[SAMPLE_RATE_METRIC] = _scaled(metrics, SAMPLE_RATE_METRIC, rate)


def thin_tracer_v04(body: bytes, content_type: Optional[str], keep: set[int], rates: Mapping[int, float]) -> Optional[bytes]:
    """
    Keep the spans at C{keep} of a v0.3/v0.4 tracer payload (msgpack, or
    JSON when the content type says so), removing emptied traces.
    """
    is_json = _media_type(content_type) == "application/json"
    document = loads(body) if is_json else _unpack(body)
    if not isinstance(document, list):
        raise PayloadError("tracer payload must be an array of traces")
    traces, kept_any = _thin_traces(document, keep, rates, _record_v04)
    if not kept_any:
        return None
    return dumps_like(traces, body) if is_json else _pack(traces)


def thin_tracer_v05(body: bytes, keep: set[int], rates: Mapping[int, float]) -> Optional[bytes]:
    """
    Keep the spans at C{keep} of a v0.5 tracer payload C{[strings,
    traces]}; the string table is kept whole (and grows by
    C{_sample_rate} when a rate is recorded and the table lacks it).
    """
    document = _unpack(body)
    if not isinstance(document, list) or len(document) != 2:
        raise PayloadError("v0.5 payload must be [string table, traces]")
    table, traces = document
    if not isinstance(table, list) or not isinstance(traces, list):
        raise PayloadError("v0.5 payload must be [string table, traces]")

    def record(span: Any, rate: float) -> None:
        if not isinstance(span, list) or len(span) != 12 or span[5] not in (0, None):
            return
        if SAMPLE_RATE_METRIC in table:
            key = table.index(SAMPLE_RATE_METRIC)
        else:
            table.append(SAMPLE_RATE_METRIC)
            key = len(table) - 1
        metrics = span[10]
        if not isinstance(metrics, dict):
            metrics = {}
            span[10] = metrics
        metrics[key] = _scaled(metrics, key, rate)

    thinned, kept_any = _thin_traces(traces, keep, rates, record)
    if not kept_any:
        return None
    return _pack([table, thinned])
