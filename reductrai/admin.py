"""
The admin resource: health, readiness and metrics.

C{/health} reports liveness with the state of the store and of each
upstream; C{/ready} answers 200 only once the store is open and every
ingest listener is bound, and 503 otherwise, for orchestrators' readiness
probes; C{/metrics} serves the Prometheus text format.

The tree is wrapped in L{reductrai.auth.AdminGuard}: every path but
C{/health} and C{/ready} needs an admin credential, including resources
added later with C{putChild} on the returned root.
"""

from __future__ import annotations

import json
import time
from typing import Callable, Optional

from twisted.web.resource import Resource

from reductrai import __version__
from reductrai.auth import AdminAuthenticator, AdminGuard
from reductrai.metrics import CONTENT_TYPE_LATEST


def _json(request, status: int, document: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


class HealthResource(Resource):
    isLeaf = True

    def __init__(self, service) -> None:
        super().__init__()
        self._service = service

    def render_GET(self, request) -> bytes:
        service = self._service
        store_status = service.store.status() if service.store is not None else {"state": "disabled"}
        upstreams = []
        if service.forwarder is not None:
            for state in service.forwarder.upstreams.values():
                upstreams.append(
                    {
                        "url": state.url,
                        "state": state.state,
                        "requests": state.requests,
                        "failures": state.failures,
                        "last_success": state.last_success,
                        "last_failure": state.last_failure,
                        "last_error": state.last_error,
                    }
                )
        document = {
            "status": "ok",
            "uptime": round(time.monotonic() - service.started_at, 3),
            "version": __version__,
            "mode": service.mode,
            "store": store_status,
            "upstreams": upstreams,
            "spool": service.spool.status() if getattr(service, "spool", None) is not None else None,
            "retention": service.retention.status() if getattr(service, "retention", None) is not None else None,
        }
        return _json(request, 200, document)


class ReadyResource(Resource):
    isLeaf = True

    def __init__(self, is_ready: Callable[[], tuple[bool, str]]) -> None:
        super().__init__()
        self._is_ready = is_ready

    def render_GET(self, request) -> bytes:
        ready, reason = self._is_ready()
        return _json(request, 200 if ready else 503, {"ready": ready, "reason": reason})


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self._metrics.render()


class NotFound(Resource):
    isLeaf = True

    def render(self, request) -> bytes:
        return _json(request, 404, {"error": "not found", "paths": ["/health", "/ready", "/metrics"]})


def admin_root(service, authenticator: Optional[AdminAuthenticator] = None) -> Resource:
    """
    Build the admin resource tree of C{service} behind its credential
    check.

    @param authenticator: the admin credentials; by default built from
        C{service.settings}.
    @raise ValueError: a credential file is unreadable or invalid.
    """
    if authenticator is None:
        authenticator = AdminAuthenticator.from_settings(service.settings)
    root = Resource()
    root.putChild(b"health", HealthResource(service))
    root.putChild(b"ready", ReadyResource(service.readiness))
    root.putChild(b"metrics", MetricsResource(service.metrics))
    if getattr(service, "store", None) is not None:
        from reductrai.query import QueryResource

        root.putChild(b"api", QueryResource(service.store, service.reactor))
    root.putChild(b"", NotFound())
    root.getChild = lambda name, request: NotFound()  # type: ignore[method-assign]
    return AdminGuard(
        root,
        authenticator,
        max_failures=service.settings["admin.max_auth_failures"],
        metrics=service.metrics,
    )
