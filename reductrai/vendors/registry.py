"""
The vendors this build knows, in lookup order.
"""

from __future__ import annotations

from reductrai.vendors import datadog
from reductrai.vendors.base import Router, Vendor

VENDORS: tuple[Vendor, ...] = (datadog.VENDOR,)


def default_router() -> Router:
    """
    Return a router over every known vendor's routes.
    """
    return Router(VENDORS)
