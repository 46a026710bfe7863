"""
Parser for the Elasticsearch bulk API (C{/_bulk} and C{/{index}/_bulk}),
and the bulk response Elasticsearch gives.

The body is NDJSON: an action/metadata line (C{{"index": {...}}},
C{{"create": {...}}}, C{{"update": {...}}} or C{{"delete": {...}}}), then,
except for C{delete}, one source line.  Empty lines are skipped.

One item is one action, its C{index} the action's position among all the
request's actions (so an action rejected for a malformed source line
leaves a gap, and L{build_bulk_response} can put its error in place):

    - C{index}, C{create} and C{update} actions give a L{LOG} item built
      from the document (for C{update}, its C{doc}, else its C{upsert}):
      C{timestamp_ns} from C{@timestamp} (ISO 8601 or epoch
      milliseconds), C{message}, C{level} from C{log.level} or C{level},
      C{service} from C{service.name}, C{host} from C{host.name} (or a
      string C{host}), C{trace_id}/C{span_id} from C{trace.id}/C{span.id};
      every leaf field becomes a dotted tag.
    - C{delete} actions give a L{METADATA} item with no document.

Every item also has the tags C{_action}, C{_index} and, when the action
names one, C{_id}.

A malformed source line (not JSON, or not an object) is a per-item error,
counted in C{rejected} with its reason in C{errors}, as Elasticsearch
reports it per item.  A malformed action line, an unknown action, a
missing source line or an action with no index fails the whole request,
as it does in Elasticsearch.
"""

from __future__ import annotations

import base64
import json
import os
import re
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import attrs

from reductrai.formats import json_text
from reductrai.formats.items import LOG, METADATA, Item, ParsedPayload, PayloadContext, PayloadError

#: Bulk actions; all but C{delete} are followed by a source line.
ACTIONS = ("index", "create", "update", "delete")

_INT64_MAX = (1 << 63) - 1
_HEX = re.compile(r"[0-9a-fA-F]+")


@attrs.frozen
class BulkAction:
    """
    One action of a bulk request.

    @ivar position: the action's position among the request's actions.
    @ivar action: C{"index"}, C{"create"}, C{"update"} or C{"delete"}.
    @ivar index: the target index (from the action, else from the path).
    @ivar document_id: the C{_id} the action names, or L{None}.
    @ivar source: the parsed source line, or L{None} for C{delete} and
        for a malformed source line.
    @ivar error: why the source line was rejected, or L{None}.
    """

    position: int
    action: str
    index: str
    document_id: Optional[str]
    source: Optional[dict[str, Any]]
    error: Optional[str] = None



def _loads(line: bytes) -> Any:
    return json_text.loads(line, reject_constants=True)


def _path_index(path: str) -> Optional[str]:
    """
    Return the default index of a C{/{index}/_bulk} path, or L{None} for
    C{/_bulk}.
    """
    parts = [part for part in path.split("/") if part]
    if len(parts) == 2 and parts[1] == "_bulk":
        return parts[0]
    return None


def parse_actions(body: bytes, context: PayloadContext) -> list[BulkAction]:
    """
    Split a bulk body into its actions.

    @param body: the decoded request body.
    @param context: the request; its path may name the default index.
    @return: the actions in wire order.
    @raise PayloadError: an action line is malformed or unknown, lacks an
        index, or is not followed by its source line; or there is no
        action at all.
    """
    default_index = _path_index(context.path)
    lines = [line.rstrip(b"\r") for line in body.split(b"\n")]
    lines = [line for line in lines if line.strip()]
    actions: list[BulkAction] = []
    cursor = 0
    while cursor < len(lines):
        line_number = cursor + 1
        try:
            header = _loads(lines[cursor])
        except (ValueError, RecursionError) as error:
            raise PayloadError(f"malformed action/metadata line [{line_number}]") from error
        if not isinstance(header, dict) or len(header) != 1:
            raise PayloadError(f"malformed action/metadata line [{line_number}]")
        ((action, metadata),) = header.items()
        if action not in ACTIONS:
            raise PayloadError(f"unknown action [{action}] on line [{line_number}]")
        if not isinstance(metadata, dict):
            raise PayloadError(f"malformed action/metadata line [{line_number}]")
        index = metadata.get("_index", default_index)
        if not isinstance(index, str) or not index:
            raise PayloadError(f"index is missing for action on line [{line_number}]")
        document_id = metadata.get("_id")
        if document_id is not None and not isinstance(document_id, (str, int)):
            raise PayloadError(f"malformed _id on line [{line_number}]")
        if action in ("update", "delete") and document_id is None:
            raise PayloadError(f"{action} needs an _id on line [{line_number}]")
        cursor += 1
        source = None
        error = None
        if action != "delete":
            if cursor >= len(lines):
                raise PayloadError(f"missing source line for action on line [{line_number}]")
            try:
                source = _loads(lines[cursor])
            except (ValueError, RecursionError):
                error = "failed to parse source: not valid JSON"
            else:
                if not isinstance(source, dict):
                    source = None
                    error = "failed to parse source: not a JSON object"
            cursor += 1
        actions.append(
            BulkAction(
                position=len(actions),
                action=action,
                index=index,
                document_id=None if document_id is None else str(document_id),
                source=source,
                error=error,
            )
        )
    if not actions:
        raise PayloadError("request body is required")
    return actions


def _field(document: Mapping[str, Any], dotted: str) -> Any:
    """
    Look up C{dotted} as a literal key or as a path of nested objects.
    """
    if dotted in document:
        return document[dotted]
    value: Any = document
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _flatten(prefix: str, value: Any, into: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, into)
    elif isinstance(value, str):
        into[prefix] = value
    else:
        into[prefix] = json.dumps(value, separators=(",", ":"))


def _timestamp_ns(value: Any) -> Optional[int]:
    """
    Convert an C{@timestamp} (ISO 8601 string or epoch milliseconds) to
    nanoseconds, or L{None} when it is absent or unreadable (Elasticsearch
    rejects it only when the index mapping requires a date).
    """
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        delta = moment - datetime(1970, 1, 1, tzinfo=timezone.utc)
        return (delta.days * 86400 + delta.seconds) * 10**9 + delta.microseconds * 1000
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) * 10**6 <= _INT64_MAX:
        return value * 10**6
    return None


def _string(value: Any) -> Optional[str]:
    return value if isinstance(value, str) and value else None


def _hex_id(value: Any, width: int) -> Optional[str]:
    if isinstance(value, str) and len(value) <= width and _HEX.fullmatch(value):
        return value.lower().rjust(width, "0")
    return None


def _document(action: BulkAction) -> Mapping[str, Any]:
    source = action.source or {}
    if action.action == "update":
        for key in ("doc", "upsert"):
            if isinstance(source.get(key), dict):
                return source[key]
        return {}
    return source


def _item(action: BulkAction) -> Item:
    tags: dict[str, str] = {}
    document = _document(action)
    _flatten("", document, tags)
    tags["_action"] = action.action
    tags["_index"] = action.index
    if action.document_id is not None:
        tags["_id"] = action.document_id
    if action.action == "delete":
        return Item(kind=METADATA, index=action.position, tags=tags)
    level = _string(_field(document, "log.level")) or _string(_field(document, "level"))
    message = _field(document, "message")
    host = _field(document, "host.name")
    if host is None and isinstance(document.get("host"), str):
        host = document["host"]
    return Item(
        kind=LOG,
        index=action.position,
        timestamp_ns=_timestamp_ns(document.get("@timestamp")),
        service=_string(_field(document, "service.name")),
        host=_string(host),
        level=level.lower() if level else None,
        trace_id=_hex_id(_field(document, "trace.id"), 32),
        span_id=_hex_id(_field(document, "span.id"), 16),
        message=message if isinstance(message, str) else None,
        tags=tags,
    )


def parse(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a bulk request: one item per well-formed action, and one entry
    in C{errors} per action whose source line is malformed.

    @param body: the decoded request body.
    @param context: the request; its path may name the default index.
    @return: the items, with C{rejected} and C{errors} for the malformed
        source lines.
    @raise PayloadError: see L{parse_actions}.
    """
    items = []
    errors = []
    for action in parse_actions(body, context):
        if action.error is None:
            items.append(_item(action))
        else:
            errors.append(action.error)
    return ParsedPayload(items, rejected=len(errors), errors=errors)


def new_document_id() -> str:
    """
    Return a new random document id in the form Elasticsearch generates:
    20 URL-safe base64 characters.
    """
    return base64.urlsafe_b64encode(os.urandom(15)).decode("ascii")


_RESULTS = {
    "index": ("created", 201),
    "create": ("created", 201),
    "update": ("updated", 200),
    "delete": ("deleted", 200),
}


def _actions_from_parsed(parsed: ParsedPayload) -> list[BulkAction]:
    """
    Rebuild the action list from a L{ParsedPayload} made by L{parse}: items
    carry their action in tags, and rejected actions are the gaps between
    item indexes, matched with C{errors} in order.
    """
    by_position = {item.index: item for item in parsed.items}
    total = len(parsed.items) + parsed.rejected
    errors = iter(parsed.errors)
    actions = []
    for position in range(total):
        item = by_position.get(position)
        if item is None:
            reason = next(errors, "failed to parse source")
            actions.append(BulkAction(position, "index", "", None, None, reason))
        else:
            actions.append(
                BulkAction(
                    position,
                    item.tags.get("_action", "index"),
                    item.tags.get("_index", ""),
                    item.tags.get("_id"),
                    None,
                )
            )
    return actions


def build_bulk_response(
    parsed_or_actions: Union[ParsedPayload, Sequence[BulkAction]], took_ms: int
) -> dict[str, Any]:
    """
    Build the bulk response Elasticsearch gives for a request: one entry
    per action, in order, keyed by the action name.

    A successful C{index}/C{create} is C{"created"} with status 201, an
    C{update} C{"updated"} and a C{delete} C{"deleted"} with status 200,
    each with C{_version} 1, C{_shards} C{{"total": 2, "successful": 1,
    "failed": 0}}, C{_primary_term} 1 and a C{_seq_no} counted per index.
    Actions without an C{_id} get a generated one.  A rejected action is
    status 400 with a C{document_parsing_exception} error.  Pass the
    actions from L{parse_actions} to keep the rejected actions' name and
    index; a L{ParsedPayload} only keeps them for accepted items.

    @param parsed_or_actions: the parsed payload or its actions.
    @param took_ms: the C{took} value, in milliseconds.
    @return: the response body, ready for C{json.dumps}.
    """
    if isinstance(parsed_or_actions, ParsedPayload):
        actions: Iterable[BulkAction] = _actions_from_parsed(parsed_or_actions)
    else:
        actions = parsed_or_actions
    sequence_numbers: dict[str, int] = {}
    entries = []
    any_error = False
    for action in actions:
        if action.error is not None:
            any_error = True
            entries.append(
                {
                    action.action: {
                        "_index": action.index,
                        "_id": action.document_id,
                        "status": 400,
                        "error": {"type": "document_parsing_exception", "reason": action.error},
                    }
                }
            )
            continue
        result, status = _RESULTS[action.action]
        sequence_number = sequence_numbers.get(action.index, 0)
        sequence_numbers[action.index] = sequence_number + 1
        entries.append(
            {
                action.action: {
                    "_index": action.index,
                    "_id": action.document_id if action.document_id is not None else new_document_id(),
                    "_version": 1,
                    "result": result,
                    "_shards": {"total": 2, "successful": 1, "failed": 0},
                    "_seq_no": sequence_number,
                    "_primary_term": 1,
                    "status": status,
                }
            }
        )
    return {"errors": any_error, "took": took_ms, "items": entries}
