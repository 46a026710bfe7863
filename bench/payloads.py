"""
Request bodies for the load workloads, written to files that the wrk Lua
script (L{bench.loadgen}) cycles through.

A workload is a list of L{Request}s saved as a manifest: one block per
request, C{REQ <method> <path> <body file>} followed by C{H <name>: <value>}
lines.  Every body is also decoded here, so that the harness has the decoded size
of each request (for decoded MB/s) without querying the daemon.
"""

from __future__ import annotations

import gzip
import json
import random
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence

import attrs

CORPUS = Path("/work/shared/corpus")
API_KEY = "0123456789abcdef0123456789abcdef"

#: Headers never copied from a captured request: wrk sets Host and
#: Content-Length itself, and connection handling is the workload's choice.
_DROPPED_HEADERS = frozenset({"host", "content-length", "connection", "transfer-encoding"})


@attrs.frozen
class Request:
    """
    One HTTP request of a workload.

    @ivar decoded_length: body size after undoing its content-encoding.
    """

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    decoded_length: int


@attrs.frozen
class Workload:
    """
    A named list of requests and how wrk should send them.

    @ivar connections: concurrent wrk connections at the maximum point.
    @ivar close: send C{Connection: close} (one TLS handshake per request).
    @ivar note: what the bodies are, for the report.
    """

    name: str
    requests: Sequence[Request]
    connections: int = 32
    close: bool = False
    note: str = ""

    @property
    def mean_decoded(self) -> float:
        return sum(r.decoded_length for r in self.requests) / len(self.requests)

    @property
    def mean_wire(self) -> float:
        return sum(len(r.body) for r in self.requests) / len(self.requests)


def write_manifest(workload: Workload, directory: Path, extra_headers: Sequence[tuple[str, str]] = ()) -> Path:
    """
    Write the bodies and the manifest of C{workload} into C{directory}.

    @param extra_headers: headers added to every request (after its own).
    @return: the manifest path.
    """
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, request in enumerate(workload.requests):
        body_path = directory / f"{index:05d}.body"
        body_path.write_bytes(request.body)
        lines.append(f"REQ {request.method} {request.path} {body_path}")
        for name, value in tuple(request.headers) + tuple(extra_headers):
            lines.append(f"H {name}: {value}")
    manifest = directory / "manifest.txt"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


# Synthetic Datadog payloads.

def series_v2_body(rng: random.Random, target: int = 1800) -> bytes:
    """
    Return a Datadog C{/api/v2/series} JSON body of about C{target} bytes:
    gauges with one point each, a host resource and a few tags, the shape
    the Datadog API client sends.
    """
    now = 1796400000 + rng.randrange(86400)
    series = []
    index = 0
    while True:
        series.append(
            {
                "metric": f"fake.checkout.request.latency.p{index}",
                "type": 3,
                "points": [{"timestamp": now, "value": round(rng.uniform(0, 500), 3)}],
                "resources": [{"name": "fake-host-01", "type": "host"}],
                "tags": ["env:bench", "service:fake-checkout", f"shard:{rng.randrange(64)}"],
                "unit": "millisecond",
            }
        )
        body = json.dumps({"series": series}, separators=(",", ":")).encode()
        if len(body) >= target:
            return body
        index += 1


_WORDS = (
    "checkout payment order cart user session request handler timeout retry "
    "database query cache miss hit upstream downstream latency error warning "
    "accepted rejected queued processed shipped invoice refund token"
).split()


def logs_v2_batch(rng: random.Random, decoded_target: int = 1 << 20) -> bytes:
    """
    Return a Datadog C{/api/v2/logs} JSON array of about C{decoded_target}
    bytes (before gzip), with log lines of varied words, ids and numbers so
    that it compresses like real application logs rather than like one
    repeated string.
    """
    entries = []
    size = 2
    base = 1796400000000
    while size < decoded_target:
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(8, 30)))
        entry = {
            "ddsource": "python",
            "ddtags": f"env:bench,version:1.{rng.randrange(10)}.{rng.randrange(100)}",
            "hostname": f"fake-host-{rng.randrange(1, 9):02d}",
            "service": rng.choice(("fake-checkout", "fake-cart", "fake-payments")),
            "status": rng.choice(("info", "info", "info", "warn", "error")),
            "message": (
                f"{base + size} {rng.choice(('GET', 'POST'))} /api/orders/{rng.randrange(10**9)} "
                f"{rng.choice((200, 200, 201, 404, 500))} {rng.uniform(0, 900):.2f}ms "
                f"trace_id={rng.getrandbits(64):016x} {words}"
            ),
        }
        encoded = json.dumps(entry, separators=(",", ":"))
        size += len(encoded) + 1
        entries.append(encoded)
    return ("[" + ",".join(entries) + "]").encode()


def small_series_workload(count: int = 16, close: bool = False) -> Workload:
    """
    C{count} distinct ~1.8 KB series bodies, sent with C{DD-API-KEY}.
    """
    rng = random.Random(1)
    requests = []
    for _ in range(count):
        body = series_v2_body(rng)
        headers = (("Content-Type", "application/json"), ("DD-API-KEY", API_KEY))
        requests.append(Request("POST", "/api/v2/series", headers, body, len(body)))
    name = "series-short-conn" if close else "series-small"
    note = "Datadog /api/v2/series JSON, %d B" % len(requests[0].body)
    if close:
        note += ", Connection: close (a full TLS handshake per request)"
    return Workload(name, requests, connections=32, close=close, note=note)


def logs_workload(count: int = 4) -> Workload:
    """
    C{count} distinct gzip log batches of ~1 MB decoded each.
    """
    rng = random.Random(2)
    requests = []
    for _ in range(count):
        decoded = logs_v2_batch(rng)
        body = gzip.compress(decoded, 6)
        headers = (
            ("Content-Type", "application/json"),
            ("Content-Encoding", "gzip"),
            ("DD-API-KEY", API_KEY),
        )
        requests.append(Request("POST", "/api/v2/logs", headers, body, len(decoded)))
    note = "Datadog /api/v2/logs gzip, %.0f KB decoded, %.0f KB on the wire" % (
        requests[0].decoded_length / 1024, len(requests[0].body) / 1024,
    )
    return Workload("logs-1mb-gzip", requests, connections=8, note=note)


# The captured corpus.

def _decoder(encoding: Optional[str]) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    """
    Return C{(decode, encode)} for a content-encoding of the corpus.
    """
    import cramjam
    import zstandard

    token = (encoding or "identity").lower()
    if token in ("gzip", "x-gzip"):
        return gzip.decompress, lambda data: gzip.compress(data, 6)
    if token == "deflate":
        def inflate(data: bytes) -> bytes:
            try:
                return zlib.decompress(data)
            except zlib.error:
                return zlib.decompress(data, -15)
        return inflate, zlib.compress
    if token in ("zstd", "zstd1"):
        return (
            lambda data: zstandard.ZstdDecompressor().decompressobj().decompress(data),
            lambda data: zstandard.ZstdCompressor().compress(data),
        )
    if token == "snappy":
        return (
            lambda data: bytes(cramjam.snappy.decompress_raw(data)),
            lambda data: bytes(cramjam.snappy.compress_raw(data)),
        )
    return (lambda data: data), (lambda data: data)


def corpus_requests(folder: str, only: Optional[Callable[[dict], bool]] = None) -> list[tuple[dict, bytes]]:
    """
    Return C{(metadata, body)} of every captured request in C{folder}.
    """
    result = []
    for meta_path in sorted((CORPUS / folder).glob("*.json")):
        meta = json.loads(meta_path.read_text())
        if only is not None and not only(meta):
            continue
        result.append((meta, (CORPUS / folder / meta["body_file"]).read_bytes()))
    return result


def _corpus_request(meta: dict, body: bytes) -> Request:
    headers = tuple(
        (name, value) for name, value in meta["headers"] if name.lower() not in _DROPPED_HEADERS
    )
    decode, _ = _decoder(meta.get("content_encoding"))
    return Request(meta["method"], meta["target"], headers, body, len(decode(body)))


def otlp_traces_workload() -> Workload:
    """
    Every captured OTLP/HTTP protobuf trace export (plain, gzip and deflate).
    """
    pairs = corpus_requests("opentelemetry-python-otlp-http", lambda meta: meta["path"] == "/v1/traces")
    requests = [_corpus_request(meta, body) for meta, body in pairs]
    return Workload("otlp-traces", requests, note=f"{len(requests)} captured /v1/traces protobuf exports")


def remote_write_workload() -> Workload:
    """
    Every captured Prometheus remote-write request (snappy protobuf).
    """
    requests = [_corpus_request(meta, body) for meta, body in corpus_requests("prometheus-remote-write")]
    return Workload("prom-remote-write", requests, note=f"{len(requests)} captured snappy WriteRequests")


# Mixed replay: the whole corpus with varied timestamps, values and ids.

_ID_KEYS = ("id", "trace_id", "span_id", "parent_id", "uuid", "aggregation_key")


def _vary_json(value, rng: random.Random, shift_s: int):
    """
    Return a copy of a decoded JSON document with timestamps shifted by
    C{shift_s} seconds, numeric values scaled and id strings replaced.
    """
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            lowered = key.lower()
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                if "time" in lowered or lowered in ("ts", "date_happened", "last_seen"):
                    scale = 10**9 if item > 10**17 else 10**6 if item > 10**14 else 10**3 if item > 10**11 else 1
                    out[key] = item + shift_s * scale
                elif lowered in ("value", "count", "sum", "min", "max", "avg"):
                    out[key] = type(item)(item * rng.uniform(0.5, 1.5)) if item else item
                else:
                    out[key] = item
            elif isinstance(item, str) and lowered in _ID_KEYS:
                out[key] = "%0*x" % (max(len(item), 1), rng.getrandbits(4 * max(len(item), 1)))
            else:
                out[key] = _vary_json(item, rng, shift_s)
        return out
    if isinstance(value, list):
        if len(value) == 2 and all(isinstance(v, (int, float)) for v in value) and value[0] > 10**9:
            return [value[0] + shift_s, value[1] * rng.uniform(0.5, 1.5)]
        return [_vary_json(item, rng, shift_s) for item in value]
    return value


def _vary_otlp(decoded: bytes, path: str, rng: random.Random, shift_s: int) -> bytes:
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    kind = {"/v1/traces": ExportTraceServiceRequest, "/v1/metrics": ExportMetricsServiceRequest,
            "/v1/logs": ExportLogsServiceRequest}[path]
    message = kind.FromString(decoded)
    shift_ns = shift_s * 10**9

    def walk(node) -> None:
        for field, value in node.ListFields():
            if field.name.endswith("time_unix_nano") and isinstance(value, int):
                setattr(node, field.name, value + shift_ns)
            elif field.name in ("trace_id", "span_id", "parent_span_id") and value:
                setattr(node, field.name, rng.getrandbits(8 * len(value)).to_bytes(len(value), "big"))
            elif field.name == "as_double":
                node.as_double = value * rng.uniform(0.5, 1.5)
            elif field.message_type is not None:
                if getattr(field, "is_repeated", None) or getattr(field, "label", None) == 3:
                    for child in value:
                        walk(child)
                else:
                    walk(value)

    walk(message)
    return message.SerializeToString()


def _vary_remote_write(decoded: bytes, rng: random.Random, shift_s: int) -> bytes:
    from reductrai.proto.prometheus_remote_pb2 import WriteRequest

    message = WriteRequest.FromString(decoded)
    for series in message.timeseries:
        for sample in series.samples:
            sample.timestamp += shift_s * 1000
            sample.value *= rng.uniform(0.5, 1.5)
    return message.SerializeToString()


def vary_body(meta: dict, body: bytes, rng: random.Random, shift_s: int) -> tuple[bytes, int]:
    """
    Return a variant of a captured body (re-encoded with its original
    content-encoding) and its decoded length.  Bodies whose format is not
    recognised are returned unchanged.
    """
    decode, encode = _decoder(meta.get("content_encoding"))
    decoded = decode(body)
    content_type = (meta.get("content_type") or "").lower()
    try:
        if "protobuf" in content_type and meta["path"] in ("/v1/traces", "/v1/metrics", "/v1/logs"):
            varied = _vary_otlp(decoded, meta["path"], rng, shift_s)
        elif "protobuf" in content_type and "write" in meta["path"]:
            varied = _vary_remote_write(decoded, rng, shift_s)
        elif "ndjson" in content_type or meta["path"].endswith("/_bulk"):
            lines = [line for line in decoded.split(b"\n") if line]
            varied = b"\n".join(
                json.dumps(_vary_json(json.loads(line), rng, shift_s), separators=(",", ":")).encode() for line in lines
            ) + b"\n"
        else:
            varied = json.dumps(_vary_json(json.loads(decoded), rng, shift_s), separators=(",", ":")).encode()
    except (ValueError, KeyError, UnicodeDecodeError):
        varied = decoded
    return encode(varied), len(varied)


def mixed_replay_workload(variants: int = 4) -> Workload:
    """
    Every captured request of the corpus, C{variants} times each with varied
    timestamps, values and ids, shuffled into one replay order.
    """
    rng = random.Random(3)
    requests = []
    for folder in sorted(path.name for path in CORPUS.iterdir() if path.is_dir()):
        for meta, body in corpus_requests(folder):
            headers = tuple(
                (name, value) for name, value in meta["headers"] if name.lower() not in _DROPPED_HEADERS
            )
            for _ in range(variants):
                varied, decoded_length = vary_body(meta, body, rng, rng.randrange(1, 86400))
                requests.append(Request(meta["method"], meta["target"], headers, varied, decoded_length))
    rng.shuffle(requests)
    return Workload(
        "mixed-replay", requests,
        note=f"whole corpus, {variants} variants per request ({len(requests)} requests)",
    )
