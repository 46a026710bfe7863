"""
The daemon's Prometheus metrics, in a registry of its own.

With several worker processes (C{server.workers}), every worker runs
prometheus_client in its multiprocess mode (L{enable_multiprocess}): each
metric value lives in a memory-mapped file of its worker in a private
directory of the data directory, and C{/metrics} in worker 0 reads all of
them.  Counters and histograms are summed over the workers, dead and
restarted ones included (a restarted worker continues its files, since
the files are named by worker id, not by PID); the gauge
C{reductrai_connections_open} is summed over the live workers.  The spool's
gauges describe the shared store and come from worker 0 alone.
C{reductrai_worker_requests} gives the ingest requests of each worker.
"""

from __future__ import annotations

import glob
import json
import os
import re
import stat
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.mmap_dict import MmapedDict

__all__ = ["Metrics", "CONTENT_TYPE_LATEST", "enable_multiprocess", "forget_worker", "prepare_metrics_dir"]

#: Name of the private metrics directory inside the data directory.
METRICS_DIR = "metrics"

_COUNTER_FILE = re.compile(r"^counter_(\d+)\.db$")


def enable_multiprocess(data_dir: str, worker: int) -> str:
    """
    Put this process's prometheus_client in multiprocess mode, its files
    named for C{worker}, in the directory L{METRICS_DIR} of C{data_dir}.
    Call it before the first metric value is created, because values
    created before stay in memory only.  The files are created with the
    first values, after L{prepare_metrics_dir}.

    @return: the directory.
    """
    directory = os.path.join(data_dir, METRICS_DIR)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    identifier = str(worker)
    values.ValueClass = values.MultiProcessValue(lambda: identifier)
    return directory


def prepare_metrics_dir(directory: str, clear: bool) -> None:
    """
    Create the multiprocess metrics directory with mode 0700 as the user
    the daemon runs as (after twistd's C{--uid}), or check an existing one.

    @param clear: remove the files of a previous run (worker 0, before it
        starts the other workers).
    @raise OSError: it cannot be created, or another user owns it.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise OSError(f"{directory} is not a directory owned by user id {os.getuid()}")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(directory, 0o700)
    if clear:
        for path in glob.glob(os.path.join(directory, "*.db")):
            os.remove(path)


def forget_worker(directory: str, worker: int) -> None:
    """
    Drop the live gauges of a worker that ended, before it is restarted.
    """
    multiprocess.mark_process_dead(str(worker), directory)


class WorkerRequestsCollector:
    """
    C{reductrai_worker_requests}: the ingest requests each worker served,
    read from the per-worker counter files at scrape time.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def describe(self):
        return []

    def collect(self):
        family = CounterMetricFamily(
            "reductrai_worker_requests", "Ingest requests answered, by worker process.", labels=["worker"]
        )
        for path in sorted(glob.glob(os.path.join(self.directory, "counter_*.db"))):
            match = _COUNTER_FILE.match(os.path.basename(path))
            if match is None:
                continue
            total = 0.0
            for key, value, _, _ in MmapedDict.read_all_values_from_file(path):
                if json.loads(key)[1] == "reductrai_requests_total":
                    total += value
            family.add_metric([match.group(1)], total)
        yield family


class Metrics:
    """
    Counters and histograms of one daemon, exposed by C{/metrics}.

    @ivar multiprocess_dir: the directory of L{enable_multiprocess} when
        several workers share the counting, else L{None}.
    """

    def __init__(self, multiprocess_dir: Optional[str] = None) -> None:
        self._children: dict = {}
        self._collectors: list = []
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "reductrai_requests",
            "Ingest requests by vendor, kind, route and answered status.",
            ["vendor", "kind", "route", "status"],
            registry=self.registry,
        )
        self.received_bytes = Counter(
            "reductrai_received_bytes",
            "Request body bytes as received, by vendor and kind.",
            ["vendor", "kind"],
            registry=self.registry,
        )
        self.decoded_bytes = Counter(
            "reductrai_decoded_bytes",
            "Request body bytes after undoing the content-encoding, by vendor and kind.",
            ["vendor", "kind"],
            registry=self.registry,
        )
        self.stored_records = Counter(
            "reductrai_stored_records",
            "Records committed to the store, by vendor and kind.",
            ["vendor", "kind"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "reductrai_rejected_requests",
            "Requests answered with an error before reaching the store, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.upstream_requests = Counter(
            "reductrai_upstream_requests",
            "Forwarded requests by upstream and outcome (the status class or an error).",
            ["upstream", "outcome"],
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "reductrai_upstream_latency_seconds",
            "Time from sending a request upstream to its whole response.",
            ["upstream"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )

        self.tls_handshake_failures = Counter(
            "reductrai_tls_handshake_failures",
            "TLS connections that ended in a TLS error before any request, by listener role.",
            ["role"],
            registry=self.registry,
        )
        self.tls_reloads = Counter(
            "reductrai_tls_reloads",
            "Reloads of the listeners' TLS certificates, by outcome (ok or error).",
            ["outcome"],
            registry=self.registry,
        )
        self.limits_hit = Counter(
            "reductrai_limits_hit",
            "Connections or requests refused by a limit, by listener role and limit.",
            ["role", "limit"],
            registry=self.registry,
        )
        self.connections_open = Gauge(
            "reductrai_connections_open",
            "Client connections open now, by listener role.",
            ["role"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.admin_auth_failures = Counter(
            "reductrai_admin_auth_failures",
            "Admin requests refused for want of a valid credential, by reason.",
            ["reason"],
            registry=self.registry,
        )

    def child(self, metric, *values: str):
        """
        Return C{metric.labels(*values)}, cached: prometheus_client checks
        and converts the label values on every C{labels} call, which the
        ingest path would otherwise pay several times per request.
        """
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def add_collector(self, collector) -> None:
        """
        Register a custom collector, one that reads state at scrape time
        such as the spool's gauges.  In multiprocess mode its metrics are
        shown beside the workers' summed metrics.
        """
        self.registry.register(collector)
        self._collectors.append(collector)

    def render(self) -> bytes:
        """
        Render every metric in the Prometheus text exposition format; in
        multiprocess mode, every worker's counters summed.
        """
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry(auto_describe=False)
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        registry.register(WorkerRequestsCollector(self.multiprocess_dir))
        for collector in self._collectors:
            registry.register(collector)
        return generate_latest(registry)
