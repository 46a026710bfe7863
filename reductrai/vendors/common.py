"""
Pieces shared by the vendor route tables.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

from reductrai.vendors.base import Answer


def endpoint_upstream(setting: str) -> Callable[[str, Mapping[str, object]], Optional[str]]:
    """
    Return an upstream resolver for a vendor with one base URL: the
    C{proxy.forward_to} URL when set, else the vendor's C{setting}, else
    L{None} (store-only for that vendor).
    """

    def upstream_base(upstream: str, settings: Mapping[str, object]) -> Optional[str]:
        forward_to = settings.get("proxy.forward_to")
        if forward_to:
            return str(forward_to)
        endpoint = settings.get(setting)
        return str(endpoint) if endpoint else None

    return upstream_base


def text_error(status: int, reason: str, context=None) -> Answer:
    """
    A plain-text error body, as Prometheus, Loki and Zipkin send them.
    """
    return Answer(status, (reason + "\n").encode("utf-8"), b"text/plain; charset=utf-8")
