"""
OTLP/HTTP export requests (traces, metrics, logs) parsed into items.

Both encodings of OTLP/HTTP are read: binary protobuf
(C{application/x-protobuf}) and OTLP/JSON (C{application/json}), whose trace
and span ids are hex strings rather than the base64 that the generic
protobuf JSON mapping uses.

One item is:

  - traces: one span, walking C{resource_spans}, then C{scope_spans}, then
    C{spans};
  - logs: one log record, walking C{resource_logs}, C{scope_logs},
    C{log_records};
  - metrics: one data point, walking C{resource_metrics}, C{scope_metrics},
    C{metrics}, then the data points of the metric's one data field (gauge,
    sum, histogram, exponential histogram or summary).

C{Item.index} counts every span, log record or data point in that walk,
rejected ones included, so the n-th unit of the walk always has index n; a
rejected unit appears in L{ParsedPayload.errors} and not in the items.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Iterable, Iterator, Optional

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from reductrai.formats import json_text
from reductrai.formats.items import (
    LOG,
    METRIC,
    SPAN,
    Item,
    ParsedPayload,
    PayloadContext,
    PayloadError,
    span_id_from_bytes,
    trace_id_from_bytes,
)

TRACES = "traces"
METRICS = "metrics"
LOGS = "logs"
SIGNALS = (TRACES, METRICS, LOGS)

JSON_CONTENT_TYPE = "application/json"
PROTOBUF_CONTENT_TYPE = "application/x-protobuf"

_REQUEST_CLASSES: dict[str, type[Message]] = {
    TRACES: trace_service_pb2.ExportTraceServiceRequest,
    METRICS: metrics_service_pb2.ExportMetricsServiceRequest,
    LOGS: logs_service_pb2.ExportLogsServiceRequest,
}

#: Field names (JSON and proto spellings) that hold hex ids in OTLP/JSON.
_ID_FIELDS = frozenset(
    {"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"}
)

#: OTLP SeverityNumber ranges to level names (1-4 TRACE .. 21-24 FATAL).
_SEVERITY_LEVELS = ("trace", "debug", "info", "warn", "error", "fatal")

_LEVEL_ALIASES = {"warning": "warn", "err": "error", "critical": "fatal"}


def signal_for_path(path: str) -> str:
    """
    Tell which OTLP signal a request path carries.

    @param path: the request path, for example C{/v1/traces}.
    @return: one of L{TRACES}, L{METRICS}, L{LOGS}.
    @raise PayloadError: the path does not end with C{/v1/traces},
        C{/v1/metrics} or C{/v1/logs}.
    """
    trimmed = path.rstrip("/")
    for signal in SIGNALS:
        if trimmed.endswith("/v1/" + signal):
            return signal
    raise PayloadError("unknown OTLP signal path")


def is_json(content_type: Optional[str]) -> bool:
    """
    Tell whether a request or response uses OTLP/JSON.

    @param content_type: a C{Content-Type} header value, or L{None}.
    @return: C{True} for C{application/json} (any parameters), C{False}
        otherwise.
    """
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == JSON_CONTENT_TYPE


def parse(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse an OTLP/HTTP export request, choosing the signal from the path.

    @param body: the request body, already decoded from its
        C{Content-Encoding}.
    @param context: the request; C{path} names the signal and
        C{content_type} the encoding (protobuf when absent).
    @return: the spans, log records or metric data points as items.
    @raise PayloadError: unknown path, unsupported content type, or a body
        that is not a valid export request.
    """
    return parse_request(body, context.content_type, signal_for_path(context.path))


def parse_request(body: bytes, content_type: Optional[str], signal: str) -> ParsedPayload:
    """
    Parse an OTLP/HTTP export request of a known signal.

    @param body: the decoded request body.
    @param content_type: the C{Content-Type} value; C{application/json}
        selects OTLP/JSON, C{application/x-protobuf} or L{None} protobuf.
    @param signal: one of L{TRACES}, L{METRICS}, L{LOGS}.
    @return: the items, with rejected units counted in C{rejected}.
    @raise PayloadError: the content type is neither protobuf nor JSON, or
        the body does not decode.
    """
    if signal not in _REQUEST_CLASSES:
        raise ValueError(f"unknown OTLP signal {signal!r}")
    if is_json(content_type):
        request = _decode_json(body, _REQUEST_CLASSES[signal])
    else:
        if content_type:
            media_type = content_type.split(";", 1)[0].strip().lower()
            if media_type != PROTOBUF_CONTENT_TYPE:
                raise PayloadError("unsupported OTLP content type")
        request = _decode_protobuf(body, _REQUEST_CLASSES[signal])
    builder = _Builder()
    if signal == TRACES:
        builder.add_spans(request)
    elif signal == LOGS:
        builder.add_logs(request)
    else:
        builder.add_metrics(request)
    return builder.result()


def encode_response(content_type: Optional[str], rejected: int, message: str, signal: str) -> bytes:
    """
    Build the body of a successful OTLP/HTTP export response.

    @param content_type: the request's C{Content-Type}; the response uses
        the same encoding (see L{response_content_type}).
    @param rejected: how many spans, data points or log records were
        rejected; when positive the response carries C{partial_success}.
    @param message: the partial success error message (ignored when
        C{rejected} is zero and C{message} is empty).
    @param signal: one of L{TRACES}, L{METRICS}, L{LOGS}.
    @return: the serialised C{Export*ServiceResponse}: protobuf bytes, or
        OTLP/JSON (C{{}} when there is nothing to report).
    """
    if signal == TRACES:
        response: Message = trace_service_pb2.ExportTraceServiceResponse()
        if rejected or message:
            response.partial_success.rejected_spans = rejected
            response.partial_success.error_message = message
    elif signal == METRICS:
        response = metrics_service_pb2.ExportMetricsServiceResponse()
        if rejected or message:
            response.partial_success.rejected_data_points = rejected
            response.partial_success.error_message = message
    elif signal == LOGS:
        response = logs_service_pb2.ExportLogsServiceResponse()
        if rejected or message:
            response.partial_success.rejected_log_records = rejected
            response.partial_success.error_message = message
    else:
        raise ValueError(f"unknown OTLP signal {signal!r}")
    if is_json(content_type):
        return json.dumps(json_format.MessageToDict(response), separators=(",", ":")).encode("utf-8")
    return response.SerializeToString()


def response_content_type(content_type: Optional[str]) -> str:
    """
    Return the C{Content-Type} of the response to a request.

    @param content_type: the request's C{Content-Type}, or L{None}.
    @return: C{application/json} for OTLP/JSON requests,
        C{application/x-protobuf} otherwise.
    """
    return JSON_CONTENT_TYPE if is_json(content_type) else PROTOBUF_CONTENT_TYPE


def _decode_protobuf(body: bytes, cls: type[Message]) -> Any:
    """
    Decode a binary protobuf request.

    @raise PayloadError: the bytes are not a valid message of C{cls}.
    """
    request = cls()
    try:
        request.ParseFromString(body)
    except (DecodeError, RecursionError, ValueError):
        raise PayloadError("invalid OTLP protobuf payload") from None
    return request


def _decode_json(body: bytes, cls: type[Message]) -> Any:
    """
    Decode an OTLP/JSON request, turning its hex ids into the base64 that
    the protobuf JSON mapping expects.

    @raise PayloadError: invalid JSON, a non-object top level, a bad hex id
        or a value of the wrong type for its field.
    """
    try:
        document = json_text.loads(body)
    except (ValueError, RecursionError):
        raise PayloadError("invalid JSON") from None
    if not isinstance(document, dict):
        raise PayloadError("OTLP/JSON payload must be a JSON object")
    try:
        converted = _hex_ids_to_base64(document)
    except RecursionError:
        raise PayloadError("OTLP/JSON payload nested too deeply") from None
    request = cls()
    try:
        json_format.ParseDict(converted, request, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, AttributeError, RecursionError):
        raise PayloadError("invalid OTLP/JSON payload") from None
    return request


def _hex_ids_to_base64(value: Any) -> Any:
    """
    Return a copy of a JSON value in which each trace, span and parent span
    id given as a hex string is re-encoded as base64.

    @raise PayloadError: an id field holds a string that is not hex.
    """
    if isinstance(value, dict):
        converted = {}
        for key, item in value.items():
            if key in _ID_FIELDS and isinstance(item, str):
                try:
                    raw = bytes.fromhex(item)
                except ValueError:
                    raise PayloadError(f"OTLP/JSON {key} is not hex") from None
                converted[key] = base64.b64encode(raw).decode("ascii")
            else:
                converted[key] = _hex_ids_to_base64(item)
        return converted
    if isinstance(value, list):
        return [_hex_ids_to_base64(item) for item in value]
    return value


def any_value_to_text(value: AnyValue) -> str:
    """
    Flatten an OTLP C{AnyValue} to a string.

    @param value: the value.
    @return: strings as they are, booleans as C{true}/C{false}, numbers in
        decimal, bytes in base64, arrays and key-value lists as compact
        JSON, and the empty string for an empty value.
    """
    return _plain_text(_any_value_to_python(value))


def _plain_text(plain: Any) -> str:
    if plain is None:
        return ""
    if isinstance(plain, str):
        return plain
    if isinstance(plain, bool):
        return "true" if plain else "false"
    if isinstance(plain, (int, float)):
        return repr(plain)
    return json.dumps(plain, separators=(",", ":"), sort_keys=False, default=str)


def _any_value_to_python(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    if kind == "array_value":
        return [_any_value_to_python(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value_to_python(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def _attributes(attributes: Iterable[KeyValue]) -> dict[str, str]:
    """
    Flatten a list of OTLP attributes to a string mapping (the last value
    wins for a repeated key).
    """
    return {kv.key: any_value_to_text(kv.value) for kv in attributes}


def _level_from_severity(severity_number: int, severity_text: str) -> Optional[str]:
    """
    Name a log record's level: from its severity number when set (the OTLP
    ranges 1-4 trace, 5-8 debug, 9-12 info, 13-16 warn, 17-20 error, 21-24
    fatal), else from its severity text lower-cased (with C{warning} read
    as C{warn}), else L{None}.
    """
    if 1 <= severity_number <= 24:
        return _SEVERITY_LEVELS[(severity_number - 1) // 4]
    text = severity_text.strip().lower()
    if not text:
        return None
    return _LEVEL_ALIASES.get(text, text)


class _Builder:
    """
    Accumulate items and rejections in wire order.
    """

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.errors: list[str] = []
        self.position = 0

    def result(self) -> ParsedPayload:
        return ParsedPayload(items=self.items, rejected=len(self.errors), errors=self.errors)

    def _next_index(self) -> int:
        index = self.position
        self.position += 1
        return index

    def add_spans(self, request: Any) -> None:
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    index = self._next_index()
                    problem = _span_problem(span)
                    if problem:
                        self.errors.append(f"span {index}: {problem}")
                        continue
                    self.items.append(_span_item(index, span, resource))

    def add_logs(self, request: Any) -> None:
        for resource_logs in request.resource_logs:
            resource = _attributes(resource_logs.resource.attributes)
            for scope_logs in resource_logs.scope_logs:
                for record in scope_logs.log_records:
                    index = self._next_index()
                    problem = _log_problem(record)
                    if problem:
                        self.errors.append(f"log record {index}: {problem}")
                        continue
                    self.items.append(_log_item(index, record, resource))

    def add_metrics(self, request: Any) -> None:
        for resource_metrics in request.resource_metrics:
            resource = _attributes(resource_metrics.resource.attributes)
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    for point, metric_type, value in _metric_points(metric):
                        self.items.append(
                            _point_item(self._next_index(), metric.name, point, metric_type, value, resource)
                        )


def _span_problem(span: Any) -> Optional[str]:
    if len(span.trace_id) != 16:
        return "trace_id must be 16 bytes"
    if len(span.span_id) != 8:
        return "span_id must be 8 bytes"
    if span.parent_span_id and len(span.parent_span_id) != 8:
        return "parent_span_id must be empty or 8 bytes"
    return None


def _log_problem(record: Any) -> Optional[str]:
    if record.trace_id and len(record.trace_id) != 16:
        return "trace_id must be empty or 16 bytes"
    if record.span_id and len(record.span_id) != 8:
        return "span_id must be empty or 8 bytes"
    return None


def _merged_tags(resource: dict[str, str], own: Iterable[KeyValue]) -> dict[str, str]:
    tags = dict(resource)
    tags.update(_attributes(own))
    return tags


def _span_item(index: int, span: Any, resource: dict[str, str]) -> Item:
    return Item(
        kind=SPAN,
        index=index,
        timestamp_ns=span.start_time_unix_nano or None,
        name=span.name,
        service=resource.get("service.name"),
        host=resource.get("host.name"),
        level="error" if span.status.code == Status.STATUS_CODE_ERROR else None,
        trace_id=trace_id_from_bytes(span.trace_id),
        span_id=span_id_from_bytes(span.span_id),
        parent_id=span_id_from_bytes(span.parent_span_id),
        tags=_merged_tags(resource, span.attributes),
    )


def _log_item(index: int, record: Any, resource: dict[str, str]) -> Item:
    return Item(
        kind=LOG,
        index=index,
        timestamp_ns=record.time_unix_nano or record.observed_time_unix_nano or None,
        service=resource.get("service.name"),
        host=resource.get("host.name"),
        level=_level_from_severity(record.severity_number, record.severity_text),
        trace_id=trace_id_from_bytes(record.trace_id),
        span_id=span_id_from_bytes(record.span_id),
        message=any_value_to_text(record.body),
        tags=_merged_tags(resource, record.attributes),
    )


def _number_value(point: Any) -> Optional[float]:
    kind = point.WhichOneof("value")
    if kind is None:
        return None
    return float(getattr(point, kind))


def _optional_sum(point: Any) -> Optional[float]:
    return point.sum if point.HasField("sum") else None


def _metric_points(metric: Any) -> Iterator[tuple[Any, str, Optional[float]]]:
    """
    Yield each data point of a metric with its item metric type and value.

    Gauges are C{gauge}; monotonic sums C{count} and other sums C{gauge};
    histograms C{histogram}, exponential histograms
    C{exponential_histogram} and summaries C{summary}, each valued by its
    sum (L{None} when a histogram carries no sum).
    """
    data = metric.WhichOneof("data")
    if data == "gauge":
        for point in metric.gauge.data_points:
            yield point, "gauge", _number_value(point)
    elif data == "sum":
        metric_type = "count" if metric.sum.is_monotonic else "gauge"
        for point in metric.sum.data_points:
            yield point, metric_type, _number_value(point)
    elif data == "histogram":
        for point in metric.histogram.data_points:
            yield point, "histogram", _optional_sum(point)
    elif data == "exponential_histogram":
        for point in metric.exponential_histogram.data_points:
            yield point, "exponential_histogram", _optional_sum(point)
    elif data == "summary":
        for point in metric.summary.data_points:
            yield point, "summary", point.sum


def _point_item(
    index: int,
    name: str,
    point: Any,
    metric_type: str,
    value: Optional[float],
    resource: dict[str, str],
) -> Item:
    return Item(
        kind=METRIC,
        index=index,
        timestamp_ns=point.time_unix_nano or None,
        name=name,
        service=resource.get("service.name"),
        host=resource.get("host.name"),
        value=value,
        metric_type=metric_type,
        tags=_merged_tags(resource, point.attributes),
    )
