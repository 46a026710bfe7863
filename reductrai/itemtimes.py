"""
Item time ranges recomputed from a stored body.

A record's header keeps the time range of its items (C{item_min_ns},
C{item_max_ns}).  The body already holds those timestamps, often with
nanosecond digits that cost a packed block about 3 bytes a record when
kept a second time.  The compactor leaves them out of a block when this
module reproduces every one of them from the bodies, and reading the
block recomputes them here.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Mapping, Optional
from urllib.parse import parse_qs

from reductrai.formats.items import PayloadContext
from reductrai.indexes import summary_of
from reductrai.vendors.base import Router

ItemTimes = tuple[Optional[int], Optional[int]]


@lru_cache(maxsize=1)
def _router() -> Router:
    from reductrai.vendors.registry import default_router

    return default_router()


def derive_item_times(fields: Mapping, body: bytes) -> Optional[ItemTimes]:
    """
    Parse C{body} as the ingest path did and return its items' time range.

    @param fields: the record's header fields; C{path}, C{content_type},
        C{query} and C{headers} are used.
    @return: C{(item_min_ns, item_max_ns)}, either L{None} when no item has
        a timestamp; or L{None} when the route has no parser or the body
        does not parse.
    """
    path = fields["path"]
    content_type = fields.get("content_type")
    match = _router().match(path.split("?", 1)[0], content_type)
    if match is None or match.route.parser is None:
        return None
    context = PayloadContext(
        path=path,
        content_type=content_type,
        query=parse_qs(fields.get("query") or "", keep_blank_values=True),
        headers={name.lower(): value for name, value in fields.get("headers") or ()},
    )
    try:
        summary = summary_of(match.route.parser(body, context).items)
    except Exception:
        return None
    return summary["item_min_ns"], summary["item_max_ns"]
