"""
The daemon as a Twisted service: the store, the forwarder, the ingest and
admin listeners, started and stopped together.
"""

from __future__ import annotations

import gc
import os
import stat
import sys
import time
from pathlib import Path
from typing import Optional

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from reductrai import __version__
from reductrai.admin import admin_root
from reductrai.config import UPSTREAM_KEYS, Settings
from reductrai.encoding import OFFLOAD_BYTES as DECODE_OFFLOAD_BYTES
from reductrai.forward import Forwarder
from reductrai.balance import ConnectionBoard, balance_accepts
from reductrai.listeners import ListenerError, adopt_listener, build_endpoint
from reductrai.metrics import Metrics, enable_multiprocess, prepare_metrics_dir
from reductrai.request import IngestSite, QuietSite
from reductrai.resource import IngestResource
from reductrai.store import RecordStore, StoreOptions
from reductrai.tls import ensure_dev_certificate
from reductrai.auth import AdminAuthenticator
from reductrai.limits import ClientRateLimiter, ConnectionLimits, IngestGuard
from reductrai.reload import Reloader, reread_secrets
from reductrai.tls import TLSManager, plain_http_upstreams
from reductrai.vendors.registry import default_router


#: Seconds between two reads of worker 0's current dictionaries in the
#: other workers.
DICTIONARY_REFRESH_INTERVAL = 3.0


class StartupError(Exception):
    """
    The daemon cannot start; the message says why and what to change.
    """


def prepare_data_dir(path: str) -> None:
    """
    Create the data directory with mode 0700, or check an existing one.

    @raise StartupError: it is not a directory, or others can write to it.
    """
    directory = Path(path)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as error:
        raise StartupError(f"cannot create data directory {path}: {error.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise StartupError(f"data directory {path} is not a directory")
    if info.st_mode & stat.S_IWOTH:
        raise StartupError(
            f"data directory {path} is writable by other users (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"run: chmod o-w {path}"
        )
    if info.st_mode & stat.S_IWGRP:
        Logger(namespace=__name__).warn(
            "Data directory {path} is writable by its group (mode {mode}); run: chmod g-w {path}",
            path=path, mode=f"{stat.S_IMODE(info.st_mode):04o}",
        )


class ReductraiService(service.MultiService):
    """
    The whole daemon.

    @ivar ports: the listening ports of the ingest listeners, in
        configuration order, once started.
    @ivar admin_ports: the listening ports of the admin listeners.
    """

    log = Logger()

    def __init__(
        self,
        settings: Settings,
        reactor=None,
        exit_on_startup_error: bool = False,
        worker: int = 0,
        inherited: Optional[list[dict]] = None,
        config_path: Optional[str] = None,
    ) -> None:
        """
        @param exit_on_startup_error: print a L{StartupError} and exit with
            status 1 instead of raising it (what C{twistd} wants).
        @param worker: the id of this process among C{server.workers}; 0
            binds the listeners and starts the others (L{reductrai.worker}).
        @param inherited: for a worker other than 0, the listening sockets
            it inherited: C{{"description", "fd", "family"}} each, in the
            order of C{server.listen}.
        @param config_path: the configuration file the settings came from,
            which the other workers read their secrets from again.
        """
        super().__init__()
        self._exit_on_startup_error = exit_on_startup_error
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.reactor = reactor
        self.settings = settings
        self.mode = settings.effective_mode
        self.worker = worker
        self.workers = settings["server.workers"]
        self._inherited = inherited or []
        self._config_path = config_path
        self._data_dir = os.path.abspath(settings["server.data_dir"])
        metrics_dir = None
        if self.workers > 1:
            # Before the first metric value exists (see reductrai.metrics).
            metrics_dir = enable_multiprocess(self._data_dir, worker)
        self.metrics = Metrics(metrics_dir)
        self.pool = None
        self.board: Optional[ConnectionBoard] = None
        self._loops: list = []
        self._spool_mirror = None
        self.store: Optional[RecordStore] = None
        self.forwarder: Optional[Forwarder] = None
        self.sampling = None
        self.sampling_counters = None
        self.compactor = None
        self.retention = None
        self.spool = None
        self.ingest_resource = None
        self.ports: list = []
        self.admin_ports: list = []
        self.started_at = time.monotonic()

    def readiness(self) -> tuple[bool, str]:
        """
        Return whether the daemon accepts traffic, and why not.
        """
        if not self.running:
            return False, "stopping" if self.ports else "starting"
        if self.mode != "forward-only" and (self.store is None or not self.store.is_open):
            return False, "store is not open"
        if len(self.ports) != len(self.settings["server.listen"]):
            return False, "not every ingest listener is bound"
        if self.workers > 1 and self.worker == 0 and (self.pool is None or len(self.pool.started) < self.workers - 1):
            return False, "not every worker process has started"
        return True, "ok"

    def _tls_files(self) -> tuple[str, str]:
        certificate = self.settings["server.tls_certificate"]
        if certificate:
            return certificate, self.settings["server.tls_private_key"]
        return ensure_dev_certificate(self._data_dir)

    def privilegedStartService(self) -> None:
        """
        Bind every listener; a failure stops the start with a clear
        message.
        """
        try:
            self._bind()
        except StartupError as error:
            self._abort(error)
        super().privilegedStartService()

    def _abort(self, error: StartupError) -> None:
        for port in self.ports + self.admin_ports:
            port.stopListening()
        if not self._exit_on_startup_error:
            raise error
        report_startup_error(error)

    def _bind(self) -> None:
        prepare_data_dir(self._data_dir)
        settings = self.settings
        if self.mode != "forward-only":
            self.store = RecordStore(
                StoreOptions(
                    path=os.path.join(self._data_dir, "store"),
                    map_size=settings["storage.map_size"],
                    max_map_size=settings["storage.max_map_size"],
                    compression_level=settings["storage.compression_level"],
                    durability=settings["storage.durability"],
                    sync_interval=settings["storage.sync_interval"],
                    # With one process per core, no core is free for threads.
                    **({"offload_bytes": 0} if self.workers > 1 else {}),
                ),
                self.reactor,
            )
            self.store.worker = self.worker
            self.store.shared = self.workers > 1
            self.store.dictionaries.trains = self.worker == 0
        if self.mode in ("forward", "sample", "forward-only"):
            try:
                self.forwarder = Forwarder(
                    self.reactor,
                    max_in_flight=settings["upstream.max_in_flight"],
                    connect_timeout=settings["upstream.connect_timeout"],
                    timeout=settings["upstream.timeout"],
                    ca_bundle=settings["upstream.ca_bundle"] or None,
                )
            except (OSError, ValueError) as error:
                raise StartupError(f"upstream.ca_bundle: {error}") from None

        if self.mode == "sample":
            from reductrai.sampling import SamplingCounters, SamplingPolicy

            self.sampling = SamplingPolicy.from_settings(settings)
            self.sampling_counters = SamplingCounters(self.metrics.registry)
        resource = IngestResource(
            default_router(), settings, self.mode, self.store, self.forwarder, self.metrics,
            sampling=self.sampling, sampling_counters=self.sampling_counters,
            index_items=settings["storage.index_items"],
            spool_on_failure=settings["spool.on_upstream_failure"],
            offload_decode_bytes=0 if self.workers > 1 else DECODE_OFFLOAD_BYTES,
        )
        self.ingest_resource = resource
        try:
            for key, url in plain_http_upstreams(settings):
                self.log.warn("{key} is plain HTTP ({url}): forwarded traffic and API keys are not encrypted", key=key, url=url)
            ingest_limits = ConnectionLimits.from_settings(settings, "ingest", self.metrics)
            admin_limits = ConnectionLimits.from_settings(settings, "admin", self.metrics)
            self.admin_auth = AdminAuthenticator.from_settings(settings)
        except ValueError as error:
            raise StartupError(str(error)) from None
        if settings["limits.client_requests_per_second"] > 0:
            limiter = ClientRateLimiter(settings["limits.client_requests_per_second"], settings["limits.client_burst"], self.reactor.seconds)
            resource = IngestGuard(resource, limiter, ingest_limits)
        self.tls = TLSManager(settings, self._tls_files, self.metrics, self.reactor)
        self.reloader = Reloader(self.reactor)
        self.reloader.add("TLS certificates", self.tls.reload)
        self.reloader.add("admin credentials", self.admin_auth.reload)
        self.reloader.add("secrets", lambda: reread_secrets(settings))
        ingest_site = IngestSite(resource, settings["limits.max_body_bytes"], timeout=settings["server.request_timeout"])
        admin_site = QuietSite(admin_root(self, self.admin_auth), limits=admin_limits, timeout=settings["server.request_timeout"])
        ingest_site.limits = ingest_limits
        if self.workers > 1:
            self.board = ConnectionBoard(os.path.join(self._data_dir, "workers.board"), self.workers, self.worker)
            ingest_limits.board = self.board
        admin_site.noisy = False
        ingest_site.noisy = False

        if self.worker > 0:
            for inherited in self._inherited:
                self.ports.append(self._adopt(inherited, ingest_site))
            return
        for description in settings["server.listen"]:
            self.ports.append(self._listen(description, ingest_site, "ingest"))
            if self.workers > 1:
                balance_accepts(self.ports[-1], self.board, self.reactor)
        for description in settings["server.admin_listen"]:
            self.admin_ports.append(self._listen(description, admin_site, "admin"))

    def _adopt(self, inherited: dict, site):
        """
        Serve C{site} on a listening socket inherited from worker 0.
        """
        description = inherited["description"]
        try:
            port = adopt_listener(
                self.reactor, description, inherited["fd"], inherited["family"], site,
                self._tls_files, self.settings["server.tls_minimum_version"],
                tls_factory=self.tls.factory("ingest"),
            )
        except (ListenerError, OSError) as error:
            raise StartupError(f"cannot adopt listener {description!r}: {error}") from None
        os.close(inherited["fd"])
        balance_accepts(port, self.board, self.reactor)
        return port

    def _listen(self, description: str, site, role: str):
        try:
            endpoint = build_endpoint(
                self.reactor, description, self._tls_files, self.settings["server.tls_minimum_version"],
                tls_factory=self.tls.factory(role),
            )
        except ListenerError as error:
            raise StartupError(str(error)) from None
        result = []
        endpoint.listen(site).addBoth(result.append)
        if not result:
            raise StartupError(f"listener {description!r} did not bind synchronously")
        outcome = result[0]
        if isinstance(outcome, Failure):
            raise StartupError(f"cannot listen on {description!r}: {outcome.getErrorMessage()}")
        address = outcome.getHost()
        self.log.info(
            "Listening for {role} traffic on {description} (port {port})",
            role=role, description=description, port=getattr(address, "port", address),
        )
        return outcome

    def startService(self) -> None:
        if self.metrics.multiprocess_dir is not None:
            try:
                prepare_metrics_dir(self.metrics.multiprocess_dir, clear=self.worker == 0)
            except OSError as error:
                self._abort(StartupError(f"cannot prepare the metrics directory: {error}"))
        if self.store is not None:
            try:
                self.store.open()
            except Exception as error:
                self._abort(StartupError(f"cannot open the store in {self._data_dir}: {error}"))
            self._start_store_services()
        super().startService()
        self.tls.start()
        self.reloader.install()
        if self.board is not None:
            try:
                self.board.open(create=self.worker == 0)
            except OSError as error:
                self.log.warn(
                    "Connections are not balanced over the workers: {error}", error=str(error), worker=self.worker
                )
        if self.workers > 1 and self.worker == 0:
            self._start_workers()
        # Objects alive after start-up (modules, route tables, settings)
        # live as long as the process: the collector stops scanning them.
        gc.freeze()
        upstreams = [f"{key}={self.settings[key]}" for key in UPSTREAM_KEYS if self.settings[key]]
        upstream = ", ".join(upstreams) if upstreams else "none"
        if self.mode == "sample":
            detail = (
                f"forwarding all metrics, events and service checks and a sample of logs and "
                f"traces (default rate {self.settings['proxy.sample_rate']:g}); everything is stored"
            )
        elif self.mode == "store-only":
            detail = "storing everything and forwarding nothing"
        elif self.mode == "forward":
            detail = "storing and forwarding everything"
        else:
            detail = "forwarding everything without storing"
        self.log.info(
            "reductrai {version} started in {mode} mode, {detail}; upstream: {upstream}; data in {data_dir}",
            version=__version__, mode=self.mode, detail=detail, upstream=upstream, data_dir=self._data_dir,
            worker=self.worker, serving=True,
        )

    def _start_workers(self) -> None:
        """
        Start workers 1 to C{server.workers - 1} on this process's ingest
        listeners (see L{reductrai.worker}).
        """
        from reductrai.worker import WorkerPool, listener_specs, settings_overrides

        specs, child_fds = listener_specs(self.settings["server.listen"], self.ports)
        overrides = settings_overrides(self.settings)

        def start_line(worker: int) -> dict:
            return {"worker": worker, "config": self._config_path, "overrides": overrides, "listeners": specs}

        metrics_dir = self.metrics.multiprocess_dir
        self.pool = WorkerPool(
            self.reactor, self.workers, start_line, child_fds,
            stop_timeout=self.settings["server.shutdown_timeout"] + 10.0,
            on_worker_ended=lambda worker: self._worker_ended(metrics_dir, worker),
        )
        self.reloader.add("worker processes", lambda: self.pool.signal_all("HUP"))
        self.pool.startService()

    def _worker_ended(self, metrics_dir, worker: int) -> None:
        from reductrai.metrics import forget_worker

        forget_worker(metrics_dir, worker)
        if self.board is not None:
            # Its connections closed with it.
            self.board.publish(0, worker)

    def _every(self, interval: float, action) -> None:
        """
        Run C{action} every C{interval} seconds until the service stops.
        """
        loop = task.LoopingCall(action)
        loop.clock = self.reactor
        loop.start(interval, now=False).addErrback(
            lambda failure: self.log.failure("Periodic task failed", failure)
        )
        self._loops.append(loop)

    def _start_store_services(self) -> None:
        """
        Start the delivery spool (when forwarding), the compactor and the
        retention passes of the open store.
        """
        from reductrai.compactor import Compactor, CompactorOptions
        from reductrai.retention import Retention, RetentionOptions

        settings = self.settings
        if self.forwarder is not None:
            self._start_spool()
        if self.worker > 0:
            # Worker 0 trains, compacts and enforces retention for all.
            self._every(DICTIONARY_REFRESH_INTERVAL, lambda: self.store.dictionaries.refresh(self.store.env))
            return
        self.compactor = Compactor(
            self.store, self.reactor,
            CompactorOptions(min_age=settings["storage.compact_after"], level=settings["storage.block_level"]),
        )
        self.retention = Retention(
            self.store, self.reactor,
            RetentionOptions(max_age=settings["retention.max_age"], max_bytes=settings["retention.max_bytes"]),
            spool_references=getattr(self.spool, "spool_references", None),
        )
        self.compactor.start()
        self.retention.start()

    def _start_spool(self) -> None:
        from reductrai.keybox import KeyBox, KeyBoxError
        from reductrai.spool import Spool, SpoolOptions

        settings = self.settings
        try:
            keybox = KeyBox.load(self._data_dir, settings["spool.key"])
        except KeyBoxError as error:
            self._abort(StartupError(f"spool.key: {error}"))
            return
        self.spool = Spool(
            self.store, self.forwarder, self.reactor,
            SpoolOptions.from_settings(settings, upstream_timeout=settings["upstream.timeout"]), keybox,
            worker=self.worker, drains=self.worker == 0,
        )
        if self.workers > 1:
            from reductrai.spool.drain import SpoolCounterMirror

            self._spool_mirror = SpoolCounterMirror(self.spool)
            self._every(1.0, self._spool_mirror.sync)
        if self.worker == 0:
            self.metrics.add_collector(self.spool.metrics_collector(counters=self.workers == 1))
        self.ingest_resource.spool = self.spool
        self.spool.start()

    def _finish_in_flight(self) -> defer.Deferred:
        """
        Let requests in flight finish, up to C{server.shutdown_timeout}
        seconds; what is cut off is already committed (record and spool
        entry) and delivered later.
        """
        timeout = self.settings["server.shutdown_timeout"]
        resource = self.ingest_resource
        waiting = resource.in_flight

        def report(idle: bool) -> None:
            if not idle:
                self.log.warn(
                    "Stopped with {count} requests still in flight after {timeout} s",
                    count=resource.in_flight, timeout=timeout,
                )
            elif waiting:
                self.log.info("Finished {count} requests in flight before stopping", count=waiting)

        return resource.wait_idle(self.reactor, timeout).addCallback(report)

    def stopService(self):
        """
        Stop accepting connections, let in-flight requests finish, then
        close the forwarder and the store.
        """
        super().stopService()
        if getattr(self, "tls", None) is not None:
            self.tls.stop()
            self.reloader.uninstall()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        workers_stopped = self.pool.stopService() if self.pool is not None else defer.succeed(None)
        closing = [defer.maybeDeferred(port.stopListening) for port in self.ports + self.admin_ports]
        d = defer.DeferredList(closing)
        if self.ingest_resource is not None:
            d.addCallback(lambda _: self._finish_in_flight())
        for worker in (self.spool, self.compactor, self.retention):
            if worker is not None:
                d.addCallback(lambda _, worker=worker: worker.stop())
        if self.forwarder is not None:
            d.addCallback(lambda _: self.forwarder.close())
        if self._spool_mirror is not None:
            d.addCallback(lambda _: self._spool_mirror.sync())
        # The store closes once every worker has stopped, so that worker 0
        # is the last writer of the environment.
        d.addCallback(lambda _: workers_stopped)
        if self.store is not None:
            d.addCallback(lambda _: self.store.close())
        return d


def report_startup_error(error: StartupError) -> None:
    """
    Print a start-up failure for a person and exit with status 1.
    """
    sys.stderr.write(f"reductrai: cannot start: {error}\n")
    raise SystemExit(1)
