"""
Real Datadog client libraries talking to the daemon over TLS.
"""

from __future__ import annotations

import json
import time

import pytest_twisted
from twisted.internet import threads

from tests.support import Upstream, read_ndjson, run_inspect, start_daemon

API_KEY = "0123456789abcdef0123456789abcdef"


def _api_client_configuration(daemon):
    from datadog_api_client import Configuration

    configuration = Configuration(host=f"https://127.0.0.1:{daemon.https_port}")
    configuration.api_key["apiKeyAuth"] = API_KEY
    configuration.ssl_ca_cert = daemon.dev_certificate
    configuration.enable_retry = False
    return configuration


def submit_with_datadog_api_client(daemon) -> list:
    """
    Submit a v2 metric series, a log and an event; return the responses.
    """
    from datadog_api_client import ApiClient
    from datadog_api_client.v1.api.events_api import EventsApi
    from datadog_api_client.v1.model.event_create_request import EventCreateRequest
    from datadog_api_client.v2.api.logs_api import LogsApi
    from datadog_api_client.v2.api.metrics_api import MetricsApi
    from datadog_api_client.v2.model.http_log import HTTPLog
    from datadog_api_client.v2.model.http_log_item import HTTPLogItem
    from datadog_api_client.v2.model.metric_intake_type import MetricIntakeType
    from datadog_api_client.v2.model.metric_payload import MetricPayload
    from datadog_api_client.v2.model.metric_point import MetricPoint
    from datadog_api_client.v2.model.metric_resource import MetricResource
    from datadog_api_client.v2.model.metric_series import MetricSeries

    with ApiClient(_api_client_configuration(daemon)) as client:
        metrics = MetricsApi(client).submit_metrics(
            body=MetricPayload(
                series=[
                    MetricSeries(
                        metric="test.client.gauge",
                        type=MetricIntakeType.GAUGE,
                        points=[MetricPoint(timestamp=int(time.time()), value=4.5)],
                        resources=[MetricResource(name="test-host", type="host")],
                        tags=["service:test-client"],
                    )
                ]
            )
        )
        logs = LogsApi(client).submit_log(
            body=HTTPLog([HTTPLogItem(message="client log line", service="test-client", ddsource="python")])
        )
        event = EventsApi(client).create_event(
            body=EventCreateRequest(title="client event", text="sent by datadog-api-client", tags=["env:test"])
        )
    return [metrics, logs, event]


def submit_with_datadogpy(daemon) -> list:
    """
    Send a metric, an event and a service check with datadogpy's api module.
    """
    from datadog import api, initialize

    initialize(
        api_key=API_KEY,
        api_host=f"https://127.0.0.1:{daemon.https_port}",
        cacert=daemon.dev_certificate,
        host_name="test-host",
        hostname_from_config=False,
        mute=False,
    )
    metric = api.Metric.send(metric="test.datadogpy.count", points=[(time.time(), 3)], type="count")
    event = api.Event.create(title="datadogpy event", text="sent by datadogpy", tags=["env:test"])
    check = api.ServiceCheck.check(check="test.check", host_name="test-host", status=0, message="fine")
    return [metric, event, check]


@pytest_twisted.ensureDeferred
async def test_datadog_api_client_store_only(tmp_path):
    """
    datadog-api-client reports success for metrics, logs and events, and
    each submission is stored.
    """
    daemon = start_daemon(tmp_path / "data")
    try:
        metrics, logs, event = await threads.deferToThread(submit_with_datadog_api_client, daemon)
        assert metrics.errors == []
        assert logs == {}
        assert event.status == "ok"
        assert event.event.title == "client event"
        records = read_ndjson(await run_inspect(daemon.data_dir, "export"))
        assert [r["path"] for r in records] == ["/api/v2/series", "/api/v2/logs", "/api/v1/events"]
        assert records[0]["body"]["series"][0]["metric"] == "test.client.gauge"
        assert records[1]["body"][0]["message"] == "client log line"
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_datadogpy_forwarded(tmp_path):
    """
    datadogpy reports success through the proxy in forward mode, and the
    upstream receives each request with the client's API key.
    """
    upstream = Upstream()
    daemon = start_daemon(tmp_path / "data", proxy__forward_to=upstream.url)
    try:
        metric, event, check = await threads.deferToThread(submit_with_datadogpy, daemon)
        for response in (metric, event, check):
            assert "errors" not in response, response
        paths = [received.uri.split(b"?")[0] for received in upstream.received]
        assert paths == [b"/api/v1/series", b"/api/v1/events", b"/api/v1/check_run"]
        for received in upstream.received:
            assert received.header("dd-api-key") == API_KEY.encode()
        records = read_ndjson(await run_inspect(daemon.data_dir, "export"))
        assert len(records) == 3
        assert records[0]["body"]["series"][0]["metric"] == "test.datadogpy.count"
    finally:
        await daemon.stop()
        await upstream.stop()
