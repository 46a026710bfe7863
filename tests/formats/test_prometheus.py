"""
Tests for L{reductrai.formats.prometheus}.

The 1.0 corpus requests are checked against a minimal protobuf wire reader
written here, so the expected samples do not depend on the C{.proto} files
under test.  Remote write 2.0 has no corpus: its requests are built with the
generated classes.
"""

from __future__ import annotations

import math
import struct
from typing import Iterator

import cramjam
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reductrai.formats import prometheus
from reductrai.formats.items import METADATA, METRIC, PayloadContext, PayloadError
from reductrai.proto import prometheus_remote_pb2, prometheus_types_pb2, prometheus_write_v2_pb2
from tests import corpus

V1_CONTEXT = PayloadContext(
    path="/api/v1/write",
    content_type="application/x-protobuf",
    headers={"x-prometheus-remote-write-version": "0.1.0"},
)
V2_CONTEXT = PayloadContext(
    path="/api/v1/write",
    content_type="application/x-protobuf;proto=io.prometheus.write.v2.Request",
    headers={"x-prometheus-remote-write-version": "2.0.0"},
)


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, position


def _fields(data: bytes) -> Iterator[tuple[int, int, object]]:
    """
    Yield (field number, wire type, value) for each field of a protobuf
    message: varints as ints, fixed64 as raw 8 bytes, length-delimited as
    bytes.
    """
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _varint(data, position)
        elif wire_type == 1:
            value, position = data[position : position + 8], position + 8
        elif wire_type == 2:
            length, position = _varint(data, position)
            value, position = data[position : position + length], position + length
        elif wire_type == 5:
            value, position = data[position : position + 4], position + 4
        else:
            raise AssertionError(f"unexpected wire type {wire_type}")
        yield number, wire_type, value


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _expected_v1(body: bytes) -> tuple[list[tuple[dict, float, int]], list[tuple[str, int, str, str]]]:
    """
    Walk a WriteRequest by hand: return (labels, value, timestamp ms) per
    sample and (family name, type, help, unit) per metadata entry.
    """
    samples = []
    metadata = []
    for number, _, value in _fields(body):
        if number == 1:
            labels = {}
            series_samples = []
            for series_number, _, series_value in _fields(value):
                if series_number == 1:
                    pair = {n: v.decode() for n, _, v in _fields(series_value)}
                    labels[pair.get(1, "")] = pair.get(2, "")
                elif series_number == 2:
                    sample_value, timestamp = 0.0, 0
                    for sample_number, _, raw in _fields(series_value):
                        if sample_number == 1:
                            sample_value = struct.unpack("<d", raw)[0]
                        elif sample_number == 2:
                            timestamp = _signed64(raw)
                    series_samples.append((sample_value, timestamp))
            samples.extend((labels, v, t) for v, t in series_samples)
        elif number == 3:
            entry = {2: b"", 4: b"", 5: b"", 1: 0}
            entry.update({n: v for n, _, v in _fields(value)})
            metadata.append((entry[2].decode(), entry[1], entry[4].decode(), entry[5].decode()))
    return samples, metadata


def _same_float(left: float, right: float) -> bool:
    return left == right or (math.isnan(left) and math.isnan(right))


CORPUS = corpus.load("prometheus-remote-write")


def test_corpus_has_all_requests():
    """
    The corpus folder contains the 15 captured remote write requests.
    """
    assert len(CORPUS) == 15


@pytest.mark.parametrize("request_", CORPUS, ids=lambda r: r.name)
def test_corpus_v1_requests(request_):
    """
    Every captured Prometheus 2.42 request parses into one item per sample
    (or one METADATA item per metadata entry) with the labels, value and
    timestamp found by walking the protobuf by hand.
    """
    body = bytes(cramjam.snappy.decompress_raw(request_.body))
    context = PayloadContext(
        path=request_.path,
        content_type=request_.meta["content_type"],
        headers={"x-prometheus-remote-write-version": request_.header("X-Prometheus-Remote-Write-Version")},
    )
    parsed = prometheus.parse(body, context)
    samples, metadata = _expected_v1(body)
    assert parsed.rejected == 0
    assert len(parsed.items) == len(samples) + len(metadata)
    assert [item.index for item in parsed.items] == list(range(len(parsed.items)))

    sample_items = parsed.items[: len(samples)]
    for item, (labels, value, timestamp) in zip(sample_items, samples):
        assert item.kind == METRIC
        assert item.name == labels["__name__"]
        assert item.host == labels.get("instance")
        assert item.service == labels.get("job")
        assert _same_float(item.value, value)
        assert item.timestamp_ns == timestamp * 1_000_000
        assert dict(item.tags) == {k: v for k, v in labels.items() if k != "__name__"}

    type_names = {1: "counter", 2: "gauge", 3: "histogram", 4: "gaugehistogram", 5: "summary", 6: "info", 7: "stateset", 0: "unknown"}
    for item, (name, type_number, help_text, unit) in zip(parsed.items[len(samples) :], metadata):
        assert item.kind == METADATA
        assert item.name == name
        assert item.metric_type == type_names[type_number]
        assert item.message == (help_text or None)
        assert item.tags.get("unit", "") == unit


def test_corpus_metadata_only_requests():
    """
    The README names 003, 008 and 013 as metadata-only requests of 202
    entries; the parser gives them only METADATA items.
    """
    for request_ in CORPUS:
        body = bytes(cramjam.snappy.decompress_raw(request_.body))
        parsed = prometheus.parse(body, V1_CONTEXT)
        kinds = {item.kind for item in parsed.items}
        if request_.name in ("003", "008", "013"):
            assert kinds == {METADATA}
            assert len(parsed.items) == 202
        else:
            assert kinds == {METRIC}
            assert 353 <= len(parsed.items) <= 394


def test_corpus_stats_count_samples():
    """
    The write statistics of a corpus request count its samples and nothing
    else (Prometheus 2.42 sent no exemplars or native histograms).
    """
    body = bytes(cramjam.snappy.decompress_raw(CORPUS[0].body))
    parsed, stats = prometheus.parse_with_stats(body, V1_CONTEXT)
    samples, _ = _expected_v1(body)
    assert stats == prometheus.WriteStats(samples=len(samples), histograms=0, exemplars=0)


def test_v1_histograms_are_items():
    """
    A 1.0 native histogram sample is an item valued by its sum, after the
    float samples of its series.
    """
    request = prometheus_remote_pb2.WriteRequest()
    series = request.timeseries.add()
    for name, value in (("__name__", "rpc_seconds"), ("instance", "fake-host-01:9100"), ("job", "fake-checkout")):
        series.labels.add(name=name, value=value)
    series.samples.add(value=1.5, timestamp=1_796_413_000_000)
    series.histograms.add(count_int=4, sum=9.25, schema=3, timestamp=1_796_413_005_000)
    series.exemplars.add(value=2.0, timestamp=1_796_413_000_000)
    parsed, stats = prometheus.parse_with_stats(request.SerializeToString(), V1_CONTEXT)
    assert [(i.index, i.value, i.metric_type) for i in parsed.items] == [(0, 1.5, None), (1, 9.25, "histogram")]
    assert parsed.items[1].timestamp_ns == 1_796_413_005_000 * 1_000_000
    assert parsed.items[1].host == "fake-host-01:9100"
    assert stats == prometheus.WriteStats(samples=1, histograms=1, exemplars=1)


def _v2_request() -> prometheus_write_v2_pb2.Request:
    symbols = ["", "__name__", "http_requests_total", "instance", "fake-host-01:9100", "job", "fake-checkout",
               "method", "GET", "Total HTTP requests.", "trace_id", "4bf92f3577b34da6", "rpc_seconds", "seconds"]
    request = prometheus_write_v2_pb2.Request(symbols=symbols)
    ref = symbols.index
    counter = request.timeseries.add()
    counter.labels_refs.extend([ref("__name__"), ref("http_requests_total"), ref("instance"),
                                ref("fake-host-01:9100"), ref("job"), ref("fake-checkout"), ref("method"), ref("GET")])
    counter.samples.add(value=10.0, timestamp=1_796_413_000_000)
    counter.samples.add(value=12.0, timestamp=1_796_413_005_000)
    counter.exemplars.add(labels_refs=[ref("trace_id"), ref("4bf92f3577b34da6")], value=1.0, timestamp=1_796_413_004_000)
    counter.metadata.type = prometheus_write_v2_pb2.Metadata.METRIC_TYPE_COUNTER
    counter.metadata.help_ref = ref("Total HTTP requests.")
    histogram = request.timeseries.add()
    histogram.labels_refs.extend([ref("__name__"), ref("rpc_seconds"), ref("job"), ref("fake-checkout")])
    histogram.histograms.add(count_int=3, sum=0.75, schema=0, timestamp=1_796_413_005_000,
                             positive_spans=[prometheus_write_v2_pb2.BucketSpan(offset=0, length=1)],
                             positive_deltas=[3])
    histogram.metadata.type = prometheus_write_v2_pb2.Metadata.METRIC_TYPE_HISTOGRAM
    histogram.metadata.unit_ref = ref("seconds")
    return request


def test_v2_request():
    """
    A 2.0 request resolves label references through the symbol table and
    gives one item per sample and histogram sample, with the metadata type.
    """
    request = _v2_request()
    parsed, stats = prometheus.parse_with_stats(request.SerializeToString(), V2_CONTEXT)
    expected = []
    for series in request.timeseries:
        refs = list(series.labels_refs)
        labels = {request.symbols[refs[i]]: request.symbols[refs[i + 1]] for i in range(0, len(refs), 2)}
        for sample in series.samples:
            expected.append((labels, sample.value, sample.timestamp, "counter"))
        for histogram in series.histograms:
            expected.append((labels, histogram.sum, histogram.timestamp, "histogram"))
    assert len(parsed.items) == len(expected) == 3
    for index, (item, (labels, value, timestamp, metric_type)) in enumerate(zip(parsed.items, expected)):
        assert item.index == index
        assert item.name == labels["__name__"]
        assert item.service == labels["job"]
        assert item.host == labels.get("instance")
        assert item.value == value
        assert item.timestamp_ns == timestamp * 1_000_000
        assert item.metric_type == metric_type
        assert dict(item.tags) == {k: v for k, v in labels.items() if k != "__name__"}
    assert stats == prometheus.WriteStats(samples=2, histograms=1, exemplars=1)
    assert prometheus.response_headers(stats) == {
        "X-Prometheus-Remote-Write-Samples-Written": "2",
        "X-Prometheus-Remote-Write-Histograms-Written": "1",
        "X-Prometheus-Remote-Write-Exemplars-Written": "1",
    }


def test_v2_bad_symbol_reference():
    """
    A label reference past the end of the symbol table makes the request
    invalid.
    """
    request = _v2_request()
    request.timeseries[0].labels_refs[1] = len(request.symbols)
    with pytest.raises(PayloadError):
        prometheus.parse(request.SerializeToString(), V2_CONTEXT)


def test_v2_odd_label_references():
    """
    An odd number of label references makes the request invalid.
    """
    request = _v2_request()
    request.timeseries[0].labels_refs.append(1)
    with pytest.raises(PayloadError):
        prometheus.parse(request.SerializeToString(), V2_CONTEXT)


@pytest.mark.parametrize(
    "content_type, version",
    [
        (None, 1),
        ("application/x-protobuf", 1),
        ("application/x-protobuf;proto=prometheus.WriteRequest", 1),
        ("application/x-protobuf; proto=io.prometheus.write.v2.Request", 2),
    ],
)
def test_protocol_version(content_type, version):
    """
    The C{proto} parameter of the content type selects the version.
    """
    assert prometheus.protocol_version(content_type) == version


def test_unknown_proto_parameter():
    """
    A C{proto} parameter naming another message is rejected.
    """
    with pytest.raises(PayloadError):
        prometheus.protocol_version("application/x-protobuf;proto=other.Message")


def test_truncated_body():
    """
    A truncated protobuf body is a PayloadError.
    """
    request = prometheus_remote_pb2.WriteRequest()
    request.timeseries.add().labels.add(name="__name__", value="up")
    body = request.SerializeToString()
    with pytest.raises(PayloadError):
        prometheus.parse(body[:-3], V1_CONTEXT)


def test_metadata_type_names_cover_enum():
    """
    Every 1.0 metadata type has a lower-case name.
    """
    request = prometheus_remote_pb2.WriteRequest()
    for value in prometheus_types_pb2.MetricMetadata.MetricType.DESCRIPTOR.values:
        request.metadata.add(type=value.number, metric_family_name=f"family_{value.number}")
    parsed = prometheus.parse(request.SerializeToString(), V1_CONTEXT)
    assert [item.metric_type for item in parsed.items] == [
        value.name.lower() for value in prometheus_types_pb2.MetricMetadata.MetricType.DESCRIPTOR.values
    ]


@settings(deadline=500, max_examples=300)
@given(body=st.binary(max_size=512), version=st.sampled_from([V1_CONTEXT, V2_CONTEXT]))
def test_arbitrary_bytes(body, version):
    """
    Arbitrary bytes give a ParsedPayload or a PayloadError, nothing else.
    """
    try:
        parsed = prometheus.parse(body, version)
    except PayloadError as error:
        assert error.reason
    else:
        assert [item.index for item in parsed.items] == list(range(len(parsed.items)))
