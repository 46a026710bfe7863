"""
Rebuild a payload with only the items a L{Decision} keeps, and re-apply
the request's content-encoding.

L{thin_payload} picks the format from the vendor, the route name and the
request path and content type (the same signals the parsers use), so it
works for every vendor's route table whatever the route names are.
Supported (log and span payloads; metrics are never thinned):

  - Datadog: C{/api/v2/logs}, C{/v1/input} (JSON and text),
    C{/api/v0.2/traces} (protobuf C{AgentPayload}), C{/v0.3/traces} and
    C{/v0.4/traces} (msgpack or JSON), C{/v0.5/traces};
  - OTLP C{/v1/traces} and C{/v1/logs}, protobuf and JSON, under any
    prefix (New Relic's and Datadog's OTLP endpoints included);
  - Zipkin C{/api/v2/spans}; New Relic C{/log/v1} and C{/trace/v1}
    (both data formats); Loki C{.../push} (protobuf, JSON v1 and v0);
    Splunk HEC event and raw; Elasticsearch C{/_bulk} and
    C{/{index}/_bulk}.

Any other route raises L{UnsupportedPayload}: the caller then forwards
the request unchanged.
"""

from __future__ import annotations

import gzip
import zlib
from typing import AbstractSet, Callable, Mapping, Optional

import brotli
import cramjam
import lz4.frame
import zstandard

from reductrai.encoding import UnsupportedEncoding, parse_content_encoding
from reductrai.formats import datadog, datadog_agent, newrelic, splunk
from reductrai.formats.items import ParsedPayload, PayloadContext, PayloadError
from reductrai.formats.otlp import LOGS, TRACES
from reductrai.sampling import thin_datadog, thin_otlp, thin_vendors
from reductrai.sampling.decision import ALL

__all__ = ["UnsupportedPayload", "payload_format", "reencode", "thin_payload"]


class UnsupportedPayload(PayloadError):
    """
    The route's payloads cannot be thinned (no thinning for the format);
    forward the request unchanged.
    """


#: Route names (of any vendor's table) that identify a format when the
#: path does not.
_ROUTE_FORMATS = {
    "logs_v2": "datadog_logs",
    "logs_v1": "datadog_logs",
    "logs_v1_key": "datadog_logs",
    "spans": "zipkin",
    "zipkin": "zipkin",
    "bulk": "elasticsearch_bulk",
    "push": "loki",
    "loki_push": "loki",
    "event": "splunk_event",
    "raw": "splunk_raw",
}


def payload_format(vendor: str, route_name: str, context: PayloadContext) -> Optional[str]:
    """
    Name the thinnable format of a request, or return L{None}.

    @param vendor: the vendor name.
    @param route_name: the route's name in its vendor's table.
    @param context: the request's path (without query) and content type.
    @return: one of C{"datadog_logs"}, C{"datadog_agent_payload"},
        C{"datadog_tracer_v04"}, C{"datadog_tracer_v05"}, C{"otlp_traces"},
        C{"otlp_logs"}, C{"zipkin"}, C{"newrelic_logs"},
        C{"newrelic_traces"}, C{"loki"}, C{"splunk_event"},
        C{"splunk_raw"}, C{"elasticsearch_bulk"}, or L{None}.
    """
    path = context.path.rstrip("/") or "/"
    if path.endswith("/v1/traces"):
        return "otlp_traces"
    if path.endswith("/v1/logs"):
        return "otlp_logs"
    if path == datadog_agent.AGENT_TRACES_PATH:
        return "datadog_agent_payload"
    if path in datadog_agent.TRACER_V04_PATHS:
        return "datadog_tracer_v04"
    if path == datadog_agent.TRACER_V05_PATH:
        return "datadog_tracer_v05"
    if datadog.ROUTES.get(path) in ("logs_v2", "logs_v1") or path.startswith("/v1/input/"):
        return "datadog_logs"
    shape = newrelic.route_shape(path)
    if shape in ("logs", "traces"):
        return f"newrelic_{shape}"
    hec = splunk.ROUTES.get(path)
    if hec is not None:
        return f"splunk_{hec}"
    if path.endswith("/loki/api/v1/push") or path.endswith("/api/prom/push"):
        return "loki"
    if path.endswith("/api/v2/spans"):
        return "zipkin"
    if path.endswith("/_bulk"):
        return "elasticsearch_bulk"
    if vendor == "datadog" and route_name == "traces":
        return "datadog_agent_payload"
    return _ROUTE_FORMATS.get(route_name)


_Thinner = Callable[[bytes, PayloadContext, set[int], Mapping[int, float]], Optional[bytes]]

_THINNERS: dict[str, _Thinner] = {
    "datadog_logs": lambda body, context, keep, rates: thin_datadog.thin_logs(body, context.content_type, keep),
    "datadog_agent_payload": lambda body, context, keep, rates: thin_datadog.thin_agent_payload(body, keep, rates),
    "datadog_tracer_v04": lambda body, context, keep, rates: thin_datadog.thin_tracer_v04(
        body, context.content_type, keep, rates
    ),
    "datadog_tracer_v05": lambda body, context, keep, rates: thin_datadog.thin_tracer_v05(body, keep, rates),
    "otlp_traces": lambda body, context, keep, rates: thin_otlp.thin(body, context.content_type, TRACES, keep, rates),
    "otlp_logs": lambda body, context, keep, rates: thin_otlp.thin(body, context.content_type, LOGS, keep, rates),
    "zipkin": lambda body, context, keep, rates: thin_vendors.thin_zipkin(body, keep),
    "newrelic_logs": lambda body, context, keep, rates: thin_vendors.thin_newrelic_logs(body, keep),
    "newrelic_traces": lambda body, context, keep, rates: thin_vendors.thin_newrelic_spans(
        body, context.headers.get("data-format", "newrelic"), keep
    ),
    "loki": lambda body, context, keep, rates: thin_vendors.thin_loki(body, context.content_type, keep),
    "splunk_event": lambda body, context, keep, rates: thin_vendors.thin_splunk_event(body, keep),
    "splunk_raw": lambda body, context, keep, rates: thin_vendors.thin_splunk_raw(body, keep),
    "elasticsearch_bulk": lambda body, context, keep, rates: thin_vendors.thin_bulk(body, keep),
}


def thin_payload(
    vendor: str,
    route_name: str,
    context: PayloadContext,
    decoded_body: bytes,
    parsed: ParsedPayload,
    keep: AbstractSet[int],
    rates: Optional[Mapping[int, float]] = None,
) -> Optional[bytes]:
    """
    Rebuild a request body with only the kept items.

    The result is a valid payload of the same format (and encoding:
    protobuf stays protobuf, JSON stays JSON) holding exactly the items at
    C{keep}, each under its original container; containers left empty are
    removed, and nothing else is reordered or changes meaning.  JSON
    arrays of records (Datadog logs, Zipkin) and line formats (HEC,
    bulk, text logs) keep each kept record's exact text; nested JSON
    (OTLP/JSON, New Relic, Loki) and binary formats are re-serialised.

    @param vendor: the vendor name.
    @param route_name: the route's name.
    @param context: the request's path, content type, query and headers.
    @param decoded_body: the body with its content-encoding undone.
    @param parsed: what the parser made of C{decoded_body}.
    @param keep: L{Decision.keep_indexes}.
    @param rates: L{Decision.rates}: the applied rate of kept items, to
        record in trace payloads; L{None} records nothing.
    @return: the new body (C{decoded_body} itself when every item is kept
        and no rate is to be recorded), or L{None} when no item is kept
        and the request must not be sent.
    @raise UnsupportedPayload: the format cannot be thinned.
    @raise PayloadError: the body does not match the format (the parser
        accepted it, so this signals a mismatch between route and
        parser).
    """
    if keep is ALL:
        return decoded_body
    indexes = {item.index for item in parsed.items}
    kept = {index for index in keep if index in indexes}
    recorded = {index: rate for index, rate in (rates or {}).items() if index in kept}
    if kept == indexes and not parsed.rejected and not recorded:
        return decoded_body if indexes else None
    if not kept:
        return None
    name = payload_format(vendor, route_name, context)
    thinner = _THINNERS.get(name) if name is not None else None
    if thinner is None:
        raise UnsupportedPayload(f"payloads of {vendor} route {route_name} cannot be thinned")
    return thinner(decoded_body, context, kept, recorded)


# --- content-encoding -----------------------------------------------------------


def _deflate(data: bytes) -> bytes:
    # zlib-wrapped (RFC 1950), as Datadog and OpenTelemetry clients send it.
    return zlib.compress(data, 6)


_ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda data: gzip.compress(data, compresslevel=6, mtime=0),
    "x-gzip": lambda data: gzip.compress(data, compresslevel=6, mtime=0),
    "deflate": _deflate,
    "zstd": lambda data: zstandard.ZstdCompressor(level=3).compress(data),
    "zstd1": lambda data: zstandard.ZstdCompressor(level=3).compress(data),
    "snappy": lambda data: bytes(cramjam.snappy.compress_raw(data)),
    "x-snappy-framed": lambda data: bytes(cramjam.snappy.compress(data)),
    "lz4": lambda data: lz4.frame.compress(data),
    "br": lambda data: brotli.compress(data),
}


def reencode(decoded_body: bytes, content_encoding: Optional[str]) -> bytes:
    """
    Encode a body with the same C{Content-Encoding} chain as the request,
    so the forwarded request keeps its headers: the encodings are applied
    in header order (the order the client applied them).  C{deflate} is
    written zlib-wrapped, C{snappy} as a snappy block (Prometheus and
    Loki), C{x-snappy-framed} in the framing format, C{zstd}/C{zstd1} as
    one zstd frame with its content size.

    @param decoded_body: the body to encode.
    @param content_encoding: the request's header value, or L{None}.
    @return: the encoded body (C{decoded_body} itself for no encoding).
    @raise UnsupportedEncoding: a token has no encoder (the same tokens as
        L{reductrai.encoding.decode_body} are supported).
    """
    tokens = parse_content_encoding(content_encoding)
    data = decoded_body
    for token in tokens:
        encoder = _ENCODERS.get(token)
        if encoder is None:
            raise UnsupportedEncoding(token)
        data = encoder(data)
    return data
