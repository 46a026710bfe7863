"""
Thinning of the other vendors' log and span payloads: Zipkin JSON v2,
New Relic logs and spans, Loki push (JSON v1 and legacy v0, protobuf),
Splunk HEC (event and raw) and Elasticsearch bulk.

Each function takes the decoded body and the item indexes to keep, as
numbered by the matching parser in L{reductrai.formats}, and returns the
body with only those items, or L{None} when none is left.  Containers
(New Relic blocks, Loki streams) that lose every item are removed; other
fields are copied as sent.
"""

from __future__ import annotations

from typing import Any, Optional

from google.protobuf.message import DecodeError

from reductrai.formats.items import PayloadError
from reductrai.formats.loki import is_protobuf
from reductrai.proto import loki_push_pb2
from reductrai.sampling.jsontext import decode_text, dumps_like, loads, stacked_values, thin_array


def thin_zipkin(body: bytes, keep: set[int]) -> Optional[bytes]:
    """
    Keep the spans at C{keep} of a Zipkin JSON v2 list, copied verbatim.
    """
    text = decode_text(body)
    thinned = thin_array(text, keep)
    return thinned.encode("utf-8")


def _thin_blocks(document: Any, records_key: str, keep: set[int], bare_records: bool) -> tuple[Any, bool]:
    """
    Filter New Relic C{[{"common": ..., records_key: [...]}]} blocks; with
    C{bare_records}, entries without C{records_key} and C{common} are
    records themselves (the Log API's bare form).
    """
    entries = document if isinstance(document, list) else [document]
    index = 0
    kept_any = False
    result = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise PayloadError("New Relic payload entries must be objects")
        if bare_records and records_key not in entry and "common" not in entry:
            if index in keep:
                result.append(entry)
                kept_any = True
            index += 1
            continue
        records = entry.get(records_key, [])
        if not isinstance(records, list):
            raise PayloadError(f"New Relic {records_key} must be a list")
        kept = []
        for record in records:
            if index in keep:
                kept.append(record)
            index += 1
        if kept:
            kept_any = True
            result.append({**entry, records_key: kept})
        elif not records:
            result.append(entry)
    if not isinstance(document, list):
        return (result[0] if result else None), kept_any
    return result, kept_any


def thin_newrelic_logs(body: bytes, keep: set[int]) -> Optional[bytes]:
    """
    Keep the logs at C{keep} of a New Relic C{/log/v1} body.
    """
    document = loads(body)
    thinned, kept_any = _thin_blocks(document, "logs", keep, bare_records=True)
    if not kept_any:
        return None
    if not isinstance(document, list):
        return body
    return dumps_like(thinned, body)


def thin_newrelic_spans(body: bytes, data_format: str, keep: set[int]) -> Optional[bytes]:
    """
    Keep the spans at C{keep} of a New Relic C{/trace/v1} body, in the New
    Relic format or, with C{Data-Format: zipkin}, as a Zipkin list.
    """
    if data_format.strip().lower() == "zipkin":
        return thin_zipkin(body, keep)
    document = loads(body)
    thinned, kept_any = _thin_blocks(document, "spans", keep, bare_records=False)
    if not kept_any:
        return None
    return dumps_like(thinned, body)


def thin_loki(body: bytes, content_type: Optional[str], keep: set[int]) -> Optional[bytes]:
    """
    Keep the entries at C{keep} of a Loki push request (protobuf, JSON v1
    C{values} or legacy v0 C{entries}), removing emptied streams.
    """
    if is_protobuf(content_type):
        return _thin_loki_protobuf(body, keep)
    document = loads(body)
    if not isinstance(document, dict) or not isinstance(document.get("streams"), list):
        raise PayloadError("Loki push payload is missing its streams array")
    index = 0
    kept_any = False
    streams = []
    for stream in document["streams"]:
        if not isinstance(stream, dict):
            raise PayloadError("each Loki stream must be an object")
        key = "values" if ("stream" in stream or "values" in stream) else "entries"
        entries = stream.get(key, [])
        if not isinstance(entries, list):
            raise PayloadError("Loki stream entries must be an array")
        kept = []
        for entry in entries:
            if index in keep:
                kept.append(entry)
            index += 1
        if kept:
            kept_any = True
            streams.append({**stream, key: kept})
        elif not entries:
            streams.append(stream)
    if not kept_any:
        return None
    return dumps_like({**document, "streams": streams}, body)


def _thin_loki_protobuf(body: bytes, keep: set[int]) -> Optional[bytes]:
    request = loki_push_pb2.PushRequest()
    try:
        request.ParseFromString(body)
    except (DecodeError, ValueError, RecursionError):
        raise PayloadError("invalid Loki protobuf payload") from None
    index = 0
    plan = []
    kept_any = False
    for stream_position, stream in enumerate(request.streams):
        drop = []
        for entry_position in range(len(stream.entries)):
            if index in keep:
                kept_any = True
            else:
                drop.append(entry_position)
            index += 1
        plan.append((stream_position, drop))
    if not kept_any:
        return None
    for stream_position, drop in reversed(plan):
        if not drop:
            continue
        entries = request.streams[stream_position].entries
        for entry_position in reversed(drop):
            del entries[entry_position]
        if not entries:
            del request.streams[stream_position]
    return request.SerializeToString()


def thin_splunk_event(body: bytes, keep: set[int]) -> Optional[bytes]:
    """
    Keep the events at C{keep} of stacked HEC event objects, each copied
    verbatim with the whitespace that followed it.
    """
    text = decode_text(body)
    spans = stacked_values(text)
    pieces = []
    for position, (start, end) in enumerate(spans):
        if position in keep:
            following = spans[position + 1][0] if position + 1 < len(spans) else len(text)
            pieces.append(text[start:following])
    if not pieces:
        return None
    return "".join(pieces).encode("utf-8")


def thin_splunk_raw(body: bytes, keep: set[int]) -> Optional[bytes]:
    """
    Keep the non-empty lines at C{keep} of an HEC raw body.
    """
    lines = [line for line in decode_text(body).splitlines() if line.strip()]
    kept = [line for position, line in enumerate(lines) if position in keep]
    if not kept:
        return None
    return ("\n".join(kept) + "\n").encode("utf-8")


def thin_bulk(body: bytes, keep: set[int]) -> Optional[bytes]:
    """
    Keep the actions at C{keep} of an Elasticsearch bulk body, each with
    its source line (C{delete} has none), lines copied verbatim.
    """
    lines = [line.rstrip(b"\r") for line in body.split(b"\n")]
    lines = [line for line in lines if line.strip()]
    kept: list[bytes] = []
    cursor = 0
    position = 0
    while cursor < len(lines):
        header = loads(lines[cursor])
        if not isinstance(header, dict) or len(header) != 1:
            raise PayloadError("malformed bulk action line")
        (action,) = header
        size = 1 if action == "delete" else 2
        if position in keep:
            kept.extend(lines[cursor : cursor + size])
        cursor += size
        position += 1
    if not kept:
        return None
    return b"\n".join(kept) + b"\n"
