"""
Each vendor's real client library (and Prometheus itself, when installed)
sending through the daemon over TLS, reporting success.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.support import read_ndjson, run_inspect, start_daemon

API_KEY = "0123456789abcdef0123456789abcdef"


class trusting:
    """
    Point requests' CA bundle variables at one certificate for a block,
    restoring the previous values after; requests lets REQUESTS_CA_BUNDLE
    override a session's own C{verify} path.
    """

    names = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")

    def __init__(self, certificate: str) -> None:
        self.certificate = certificate

    def __enter__(self) -> None:
        self.saved = {name: os.environ.get(name) for name in self.names}
        for name in self.names:
            os.environ[name] = self.certificate

    def __exit__(self, *exc_info) -> None:
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _paths(records) -> list[str]:
    return [record["path"] for record in records]


def export_opentelemetry(port: int, certificate: str) -> list:
    """
    Export spans, metrics and logs with the OTLP/HTTP exporters (protobuf,
    gzip) and return the exporters' results.
    """
    from opentelemetry._logs import SeverityNumber
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogExporter, SimpleLogRecordProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    resource = Resource.create({"service.name": "client-test", "host.name": "test-host"})
    base = f"https://127.0.0.1:{port}"
    common = dict(certificate_file=certificate, compression=Compression.Gzip, headers={"api-key": API_KEY})

    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = tracer_provider.get_tracer("client-test")
    with tracer.start_as_current_span("parent"):
        with tracer.start_as_current_span("child"):
            pass
    with trusting(certificate):
        trace_result = OTLPSpanExporter(endpoint=f"{base}/v1/traces", **common).export(spans.get_finished_spans())

    reader = InMemoryMetricReader()
    meter = MeterProvider(resource=resource, metric_readers=[reader]).get_meter("client-test")
    meter.create_counter("client.requests").add(3)
    with trusting(certificate):
        metric_result = OTLPMetricExporter(endpoint=f"{base}/v1/metrics", **common).export(reader.get_metrics_data())

    logs = InMemoryLogExporter()
    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    logger_provider.get_logger("client-test").emit(
        body="client log line", severity_number=SeverityNumber.ERROR, severity_text="ERROR"
    )
    with trusting(certificate):
        log_result = OTLPLogExporter(endpoint=f"{base}/v1/logs", **common).export(logs.get_finished_logs())
    return [trace_result, metric_result, log_result]


@pytest_twisted.ensureDeferred
async def test_opentelemetry_exporters(tmp_path):
    """
    The OTLP/HTTP span, metric and log exporters report success.
    """
    from opentelemetry.sdk.trace.export import SpanExportResult

    daemon = start_daemon(tmp_path / "data")
    try:
        results = await threads.deferToThread(export_opentelemetry, daemon.https_port, daemon.dev_certificate)
        assert results[0] == SpanExportResult.SUCCESS
        assert results[1].name == "SUCCESS"
        assert results[2].name == "SUCCESS"
        records = read_ndjson(await run_inspect(daemon.data_dir, "ls", "--json"))
        assert _paths(records) == ["/v1/traces", "/v1/metrics", "/v1/logs"]
        assert [r["vendor"] for r in records] == ["otlp"] * 3
    finally:
        await daemon.stop()


def send_newrelic(port: int, certificate: str) -> list:
    from newrelic_telemetry_sdk import Event, EventClient, GaugeMetric, Log, LogClient, MetricClient, Span, SpanClient

    options = dict(host="127.0.0.1", port=port, ca_certs=certificate, cert_reqs="CERT_REQUIRED")
    return [
        MetricClient(API_KEY, **options).send_batch([GaugeMetric("client.gauge", 1.5, {"service.name": "nr"})]),
        EventClient(API_KEY, **options).send_batch([Event("ClientEvent", {"k": "v"})]),
        LogClient(API_KEY, **options).send_batch([Log("client log line", level="ERROR")]),
        SpanClient(API_KEY, **options).send_batch([Span("client-span", tags={"service.name": "nr"})]),
    ]


@pytest_twisted.ensureDeferred
async def test_newrelic_telemetry_sdk(tmp_path):
    """
    newrelic-telemetry-sdk (HTTPS only) reports success for metrics,
    events, logs and spans.
    """
    daemon = start_daemon(tmp_path / "data")
    try:
        responses = await threads.deferToThread(send_newrelic, daemon.https_port, daemon.dev_certificate)
        for response in responses:
            assert response.ok, (response.status, response.data)
            assert response.status == 202
            assert "requestId" in json.loads(response.data)
        records = read_ndjson(await run_inspect(daemon.data_dir, "ls", "--json"))
        assert _paths(records) == ["/metric/v1", "/v1/accounts/events", "/log/v1", "/trace/v1"]
    finally:
        await daemon.stop()


def log_with_handlers(port: int, certificate: str) -> None:
    """
    Log through splunk-handler and python-logging-loki (both on requests,
    trusting the development certificate through REQUESTS_CA_BUNDLE).
    """
    import logging_loki
    from splunk_handler import SplunkHandler

    with trusting(certificate):
        splunk = SplunkHandler(
            host="127.0.0.1", port=port, protocol="https", verify=True, token=API_KEY,
            index="main", hostname="test-host", source="client-test", sourcetype="test:app",
            flush_interval=0, retry_count=0,
        )
        loki = logging_loki.LokiHandler(
            url=f"https://127.0.0.1:{port}/loki/api/v1/push", tags={"service": "client-test"}, version="1",
        )
        logger = logging.getLogger("reductrai-client-test")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        failures = []
        for handler in (splunk, loki):
            handler.handleError = lambda record, failures=failures: failures.append(record)
            logger.addHandler(handler)
        logger.warning("first line")
        logger.error("second line")
        for handler in (splunk, loki):
            logger.removeHandler(handler)
            handler.close()
        if failures:
            raise AssertionError(f"{len(failures)} log records failed to send")


@pytest_twisted.ensureDeferred
async def test_splunk_and_loki_handlers(tmp_path):
    """
    splunk-handler and python-logging-loki deliver every record.
    """
    daemon = start_daemon(tmp_path / "data")
    try:
        await threads.deferToThread(log_with_handlers, daemon.https_port, daemon.dev_certificate)
        records = read_ndjson(await run_inspect(daemon.data_dir, "export"))
        by_vendor = {}
        for record in records:
            by_vendor.setdefault(record["vendor"], []).append(record)
        assert len(by_vendor["splunk"]) == 2
        assert len(by_vendor["loki"]) == 2
        assert by_vendor["splunk"][1]["body"]["event"].endswith("second line")
        assert by_vendor["loki"][0]["body"]["streams"][0]["values"][0][1].endswith("first line")
    finally:
        await daemon.stop()


def bulk_index(port: int, certificate: str):
    from elasticsearch import Elasticsearch, helpers

    client = Elasticsearch(f"https://127.0.0.1:{port}", ca_certs=certificate, api_key=API_KEY, max_retries=0)
    documents = [{"_index": "logs-client", "_source": {"message": f"line {n}", "level": "info"}} for n in range(25)]
    return helpers.bulk(client, documents, chunk_size=10)


@pytest_twisted.ensureDeferred
async def test_elasticsearch_bulk_helper(tmp_path):
    """
    elasticsearch-py's helpers.bulk indexes every document.
    """
    daemon = start_daemon(tmp_path / "data")
    try:
        succeeded, errors = await threads.deferToThread(bulk_index, daemon.https_port, daemon.dev_certificate)
        assert succeeded == 25
        assert errors == []
        records = read_ndjson(await run_inspect(daemon.data_dir, "ls", "--json"))
        assert len(records) == 3
        assert {r["vendor"] for r in records} == {"elasticsearch"}
    finally:
        await daemon.stop()


def run_prometheus(binary: str, directory, port: int, certificate: str, seconds: float) -> str:
    """
    Run Prometheus scraping itself and remote-writing to the daemon for a
    bounded time; return its log.
    """
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        web_port = probe.getsockname()[1]
    config = directory / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: self\n    static_configs:\n      - targets: ['127.0.0.1:" + str(web_port) + "']\n"
        f"remote_write:\n  - url: https://127.0.0.1:{port}/api/v1/write\n"
        f"    tls_config:\n      ca_file: {certificate}\n"
        "    authorization:\n      credentials: " + API_KEY + "\n"
        "    queue_config:\n      batch_send_deadline: 1s\n"
    )
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    time.sleep(seconds)
    process.terminate()
    output, _ = process.communicate(timeout=30)
    return output.decode("utf-8", "replace")


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Prometheus is not installed (apt-get install prometheus)")
@pytest_twisted.ensureDeferred
async def test_prometheus_remote_write(tmp_path):
    """
    A real Prometheus remote-writes its own metrics through the daemon.
    """
    daemon = start_daemon(tmp_path / "data")
    try:
        log = await threads.deferToThread(
            run_prometheus, shutil.which("prometheus"), tmp_path, daemon.https_port, daemon.dev_certificate, 8.0
        )
        records = read_ndjson(await run_inspect(daemon.data_dir, "ls", "--json", "--vendor", "prometheus"))
        assert records, log
        assert "non-recoverable error" not in log
    finally:
        await daemon.stop()
