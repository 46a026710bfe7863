"""
/metrics scraped over HTTP and parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from tests.support import send_raw, start_daemon


@pytest_twisted.ensureDeferred
async def test_scrape_parses(tmp_path):
    """
    After one stored request and one refused by a limit, the scrape parses
    and holds the request, limit and connection metrics with those values.
    """
    tokens = tmp_path / "tokens"
    tokens.write_text("scrape-token\n")
    daemon = start_daemon(tmp_path / "data", admin__tokens_file=str(tokens), limits__max_header_count=8)
    try:
        headers = [("Host", "x"), ("Content-Type", "application/json")]
        assert (await send_raw(daemon.http_port, "POST", "/api/v2/series", headers, b'{"series":[]}'))[0] == 202
        many = headers + [(f"X-{n}", "v") for n in range(10)]
        assert (await send_raw(daemon.http_port, "POST", "/api/v2/series", many, b"{}"))[0] == 431
        status, response_headers, body = await send_raw(
            daemon.admin_port, "GET", "/metrics", [("Host", "x"), ("Authorization", "Bearer scrape-token")], b""
        )
        assert status == 200
        assert dict(response_headers)["Content-Type"].startswith("text/plain")
        samples = {}
        for family in text_string_to_metric_families(body.decode("utf-8")):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        requests = [value for (name, labels), value in samples.items()
                    if name == "reductrai_requests_total" and ("status", "202") in labels]
        assert requests == [1.0]
        assert samples[("reductrai_limits_hit_total", (("limit", "header_count"), ("role", "ingest")))] == 1.0
        assert samples[("reductrai_connections_open", (("role", "admin"),))] == 1.0
        assert ("reductrai_connections_open", (("role", "ingest"),)) in samples
    finally:
        await daemon.stop()
