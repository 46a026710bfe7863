"""
Item counts of captured requests, computed from the vendors' own schemas
(protobuf classes, JSON) without the parsers under test.
"""

from __future__ import annotations

import gzip
import json
import zlib

import cramjam
import zstandard


def decode(captured) -> bytes:
    """
    Undo a captured body's content-encoding with the reference libraries.
    """
    encoding = (captured.meta.get("content_encoding") or "").lower()
    body = captured.body
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding in ("zstd", "zstd1"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    if encoding == "snappy":
        return bytes(cramjam.snappy.decompress_raw(body))
    raise AssertionError(f"unexpected encoding {encoding}")


def _datadog(path: str, document) -> int:
    if path in ("/api/v1/series", "/api/v2/series", "/api/v1/distribution_points"):
        return sum(len(series["points"]) for series in document["series"])
    if path in ("/api/v1/events", "/api/v2/events"):
        return 1
    if isinstance(document, list):
        return len(document)
    return 1


def _otlp(path: str, body: bytes) -> int:
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    if path == "/v1/traces":
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        return sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
    if path == "/v1/logs":
        request = logs_service_pb2.ExportLogsServiceRequest.FromString(body)
        return sum(len(scope.log_records) for resource in request.resource_logs for scope in resource.scope_logs)
    request = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
    total = 0
    for resource in request.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                kind = metric.WhichOneof("data")
                total += len(getattr(metric, kind).data_points)
    return total


def _prometheus(body: bytes) -> int:
    from reductrai.proto import prometheus_remote_pb2

    request = prometheus_remote_pb2.WriteRequest.FromString(body)
    samples = sum(len(series.samples) + len(series.histograms) for series in request.timeseries)
    return samples + len(request.metadata)


def _loki(document) -> int:
    total = 0
    for stream in document["streams"]:
        total += len(stream.get("values", stream.get("entries", [])))
    return total


def _newrelic(path: str, document) -> int:
    if "/events" in path:
        return len(document) if isinstance(document, list) else 1
    key = {"/metric/v1": "metrics", "/log/v1": "logs", "/trace/v1": "spans"}[path]
    return sum(len(block.get(key, [])) for block in document)


def _splunk(text: str) -> int:
    decoder = json.JSONDecoder()
    position, count = 0, 0
    while position < len(text):
        while position < len(text) and text[position] in " \t\r\n":
            position += 1
        if position >= len(text):
            break
        _, position = decoder.raw_decode(text, position)
        count += 1
    return count


def _elasticsearch(text: str) -> int:
    lines = [line for line in text.split("\n") if line.strip()]
    count, index = 0, 0
    while index < len(lines):
        action = next(iter(json.loads(lines[index])))
        count += 1
        index += 1 if action == "delete" else 2
    return count


def expected_items(captured) -> int:
    """
    Count the items of a captured request by its vendor's schema.
    """
    body = decode(captured)
    path = captured.path
    folder = captured.folder
    if folder.startswith("datadog"):
        return _datadog(path, json.loads(body))
    if folder.startswith("opentelemetry"):
        return _otlp(path, body)
    if folder.startswith("prometheus"):
        return _prometheus(body)
    if folder.startswith("python-logging-loki"):
        return _loki(json.loads(body))
    if folder.startswith("newrelic"):
        return _newrelic(path, json.loads(body))
    if folder.startswith("splunk"):
        return _splunk(body.decode("utf-8"))
    if folder.startswith("elasticsearch"):
        return _elasticsearch(body.decode("utf-8"))
    raise AssertionError(f"no expectation for {folder}")
