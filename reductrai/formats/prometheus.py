"""
Prometheus remote write requests (1.0 and 2.0) parsed into items.

The body is the protobuf after the snappy block compression has been undone.
The version comes from the C{Content-Type}: C{application/x-protobuf} with no
C{proto} parameter, or with C{proto=prometheus.WriteRequest}, is remote write
1.0 (C{prometheus.WriteRequest}); C{proto=io.prometheus.write.v2.Request} is
remote write 2.0.

One item is one sample or one native histogram sample.  Items are numbered in
this order: for each time series in wire order, its float samples, then its
histogram samples.  A 1.0 request's C{metadata} entries follow all series,
one L{METADATA} item each (a metadata-only request, as Prometheus sends every
C{metadata_config.send_interval}, holds only those).  Exemplars are not
items; they stay with their series.

Sample items: C{name} from the C{__name__} label, C{value} the float value
(a histogram's sum), C{timestamp_ns} the millisecond timestamp times 10**6,
C{tags} every other label, C{host} the C{instance} label and C{service} the
C{job} label.  Histogram samples have C{metric_type} C{"histogram"}; float
samples of a 2.0 series carry the series' metadata type (C{"counter"},
C{"gauge"}, ...) when it is set.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import attrs
from google.protobuf.message import DecodeError

from reductrai.formats.items import METADATA, METRIC, Item, ParsedPayload, PayloadContext, PayloadError
from reductrai.proto import prometheus_remote_pb2, prometheus_types_pb2, prometheus_write_v2_pb2

V1_PROTO = "prometheus.WriteRequest"
V2_PROTO = "io.prometheus.write.v2.Request"

SAMPLES_WRITTEN_HEADER = "X-Prometheus-Remote-Write-Samples-Written"
HISTOGRAMS_WRITTEN_HEADER = "X-Prometheus-Remote-Write-Histograms-Written"
EXEMPLARS_WRITTEN_HEADER = "X-Prometheus-Remote-Write-Exemplars-Written"

_NANOSECONDS_PER_MILLISECOND = 1_000_000

_V1_TYPES = {
    value.number: value.name.lower()
    for value in prometheus_types_pb2.MetricMetadata.MetricType.DESCRIPTOR.values
}
_V2_TYPES = {
    value.number: value.name[len("METRIC_TYPE_") :].lower()
    for value in prometheus_write_v2_pb2.Metadata.MetricType.DESCRIPTOR.values
}


@attrs.frozen
class WriteStats:
    """
    Counts of the samples, histograms and exemplars in a remote write
    request, for the 2.0 response headers.

    @ivar samples: float samples.
    @ivar histograms: native histogram samples.
    @ivar exemplars: exemplars.
    """

    samples: int = 0
    histograms: int = 0
    exemplars: int = 0


def protocol_version(content_type: Optional[str]) -> int:
    """
    Tell the remote write version from the request's C{Content-Type}.

    @param content_type: the header value, or L{None}.
    @return: C{1} or C{2}.
    @raise PayloadError: the C{proto} parameter names another message.
    """
    if not content_type:
        return 1
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "proto":
            proto = value.strip().strip('"')
            if proto == V2_PROTO:
                return 2
            if proto == V1_PROTO:
                return 1
            raise PayloadError("unsupported remote write proto message")
    return 1


def parse(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a remote write request.

    @param body: the protobuf bytes, snappy already undone.
    @param context: the request; its C{content_type} picks the version.
    @return: one item per sample and histogram sample, or per metadata
        entry (see the module docstring for the order).
    @raise PayloadError: the body is not a valid request of that version.
    """
    return parse_with_stats(body, context)[0]


def parse_with_stats(body: bytes, context: PayloadContext) -> tuple[ParsedPayload, WriteStats]:
    """
    Parse a remote write request and count its samples, histograms and
    exemplars.

    @param body: the protobuf bytes, snappy already undone.
    @param context: the request; its C{content_type} picks the version.
    @return: the parsed payload (as L{parse}) and the sample, histogram and
        exemplar counts for L{response_headers}.
    @raise PayloadError: the body is not a valid request of that version.
    """
    if protocol_version(context.content_type) == 2:
        return _parse_v2(body)
    return _parse_v1(body)


def response_headers(stats: WriteStats) -> dict[str, str]:
    """
    Build the headers of a remote write 2.0 receiver's response.

    @param stats: what was written.
    @return: the C{X-Prometheus-Remote-Write-*-Written} headers with
        decimal counts.
    """
    return {
        SAMPLES_WRITTEN_HEADER: str(stats.samples),
        HISTOGRAMS_WRITTEN_HEADER: str(stats.histograms),
        EXEMPLARS_WRITTEN_HEADER: str(stats.exemplars),
    }


def _decode(body: bytes, message: Any) -> Any:
    try:
        message.ParseFromString(body)
    except (DecodeError, RecursionError, ValueError):
        raise PayloadError("invalid remote write protobuf payload") from None
    return message


def _sample_item(
    index: int,
    labels: Mapping[str, str],
    value: float,
    timestamp_ms: int,
    metric_type: Optional[str],
) -> Item:
    tags = {name: label_value for name, label_value in labels.items() if name != "__name__"}
    return Item(
        kind=METRIC,
        index=index,
        timestamp_ns=timestamp_ms * _NANOSECONDS_PER_MILLISECOND,
        name=labels.get("__name__"),
        service=labels.get("job"),
        host=labels.get("instance"),
        value=value,
        metric_type=metric_type,
        tags=tags,
    )


def _histogram_value(histogram: Any) -> float:
    return histogram.sum


def _series_items(
    items: list[Item],
    labels: Mapping[str, str],
    samples: Iterable[Any],
    histograms: Iterable[Any],
    metric_type: Optional[str],
) -> tuple[int, int]:
    """
    Append a series' sample and histogram items; return their counts.
    """
    sample_count = 0
    histogram_count = 0
    for sample in samples:
        items.append(_sample_item(len(items), labels, sample.value, sample.timestamp, metric_type))
        sample_count += 1
    for histogram in histograms:
        items.append(
            _sample_item(len(items), labels, _histogram_value(histogram), histogram.timestamp, "histogram")
        )
        histogram_count += 1
    return sample_count, histogram_count


def _parse_v1(body: bytes) -> tuple[ParsedPayload, WriteStats]:
    request = _decode(body, prometheus_remote_pb2.WriteRequest())
    items: list[Item] = []
    samples = histograms = exemplars = 0
    for series in request.timeseries:
        labels = {label.name: label.value for label in series.labels}
        added_samples, added_histograms = _series_items(items, labels, series.samples, series.histograms, None)
        samples += added_samples
        histograms += added_histograms
        exemplars += len(series.exemplars)
    for metadata in request.metadata:
        tags = {}
        if metadata.unit:
            tags["unit"] = metadata.unit
        items.append(
            Item(
                kind=METADATA,
                index=len(items),
                name=metadata.metric_family_name,
                message=metadata.help or None,
                metric_type=_V1_TYPES.get(metadata.type, "unknown"),
                tags=tags,
            )
        )
    return ParsedPayload(items=items), WriteStats(samples, histograms, exemplars)


def _symbol(symbols: Any, ref: int) -> str:
    if ref >= len(symbols):
        raise PayloadError("remote write 2.0 symbol reference out of range")
    return symbols[ref]


def _v2_labels(symbols: Any, refs: Any) -> dict[str, str]:
    if len(refs) % 2:
        raise PayloadError("remote write 2.0 labels_refs has an odd length")
    return {_symbol(symbols, refs[i]): _symbol(symbols, refs[i + 1]) for i in range(0, len(refs), 2)}


def _parse_v2(body: bytes) -> tuple[ParsedPayload, WriteStats]:
    request = _decode(body, prometheus_write_v2_pb2.Request())
    symbols = request.symbols
    items: list[Item] = []
    samples = histograms = exemplars = 0
    for series in request.timeseries:
        labels = _v2_labels(symbols, series.labels_refs)
        for exemplar in series.exemplars:
            _v2_labels(symbols, exemplar.labels_refs)
        metadata = series.metadata
        _symbol(symbols, metadata.help_ref)
        _symbol(symbols, metadata.unit_ref)
        metric_type = _V2_TYPES.get(metadata.type) if metadata.type else None
        added_samples, added_histograms = _series_items(
            items, labels, series.samples, series.histograms, metric_type
        )
        samples += added_samples
        histograms += added_histograms
        exemplars += len(series.exemplars)
    return ParsedPayload(items=items), WriteStats(samples, histograms, exemplars)
