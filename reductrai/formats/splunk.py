"""
Parsers for the Splunk HTTP Event Collector (HEC), and HEC's error table.

Route shapes (keys of L{PARSERS}) and the paths they serve:

    - C{event}: C{/services/collector}, C{/services/collector/event} and
      their C{/1.0} forms.  The body is one or more JSON event objects
      stacked one after the other, with or without whitespace between
      them (no array, no commas).  One item per event object.
    - C{raw}: C{/services/collector/raw} and C{/services/collector/raw/1.0}.
      Raw text; one item per non-empty line.

An event item is a L{LOG}: C{message} is C{event} (a string as is, any
other JSON value as compact JSON), C{timestamp_ns} is C{time} (float epoch
seconds, or a numeric string) in nanoseconds, C{host} is C{host}; the tags
are C{source}, C{sourcetype}, C{index} and the indexed C{fields} (a list
value joined with C{","}).  C{service} is the C{service} field when there
is one, else the C{source}.  The C{host}, C{source}, C{sourcetype} and
C{index} query parameters are defaults for every event and raw line.

Errors raise L{HecError}, a L{PayloadError} that carries HEC's own error
code (see L{HEC_ERRORS}) and, for errors in a given event, the event's
position as HEC reports it in C{invalid-event-number}.
"""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Mapping, Optional

import attrs

from reductrai.formats.items import LOG, Item, ParsedPayload, PayloadContext, PayloadError


@attrs.frozen
class HecStatus:
    """
    One HEC status code as Splunk documents it.

    @ivar code: the C{code} in the JSON body.
    @ivar http_status: the HTTP status HEC sends with it.
    @ivar text: the C{text} in the JSON body.
    """

    code: int
    http_status: int
    text: str


#: HEC status codes as Splunk documents them ("Troubleshoot HTTP Event
#: Collector"): code to HTTP status and text.
HEC_ERRORS: Mapping[int, HecStatus] = {
    status.code: status
    for status in (
        HecStatus(0, 200, "Success"),
        HecStatus(1, 403, "Token disabled"),
        HecStatus(2, 401, "Token is required"),
        HecStatus(3, 401, "Invalid authorization"),
        HecStatus(4, 403, "Invalid token"),
        HecStatus(5, 400, "No data"),
        HecStatus(6, 400, "Invalid data format"),
        HecStatus(7, 400, "Incorrect index"),
        HecStatus(8, 500, "Internal server error"),
        HecStatus(9, 503, "Server is busy"),
        HecStatus(10, 400, "Data channel is missing"),
        HecStatus(11, 400, "Invalid data channel"),
        HecStatus(12, 400, "Event field is required"),
        HecStatus(13, 400, "Event field cannot be blank"),
        HecStatus(14, 400, "ACK is disabled"),
        HecStatus(15, 400, "Error in handling indexed fields"),
        HecStatus(16, 400, "Query string authorization is not enabled"),
        HecStatus(17, 200, "HEC is healthy"),
        HecStatus(18, 503, "HEC is unhealthy, queues are full"),
        HecStatus(19, 503, "HEC is unhealthy, ack service unavailable"),
        HecStatus(20, 503, "HEC is unhealthy, queues are full, ack service unavailable"),
    )
}

SUCCESS = 0
NO_DATA = 5
INVALID_DATA_FORMAT = 6
INCORRECT_INDEX = 7
EVENT_FIELD_REQUIRED = 12
EVENT_FIELD_BLANK = 13
INDEXED_FIELDS_ERROR = 15


class HecError(PayloadError):
    """
    The payload is invalid in one of the ways HEC reports with a code.

    @ivar code: the HEC code (a key of L{HEC_ERRORS}).
    @ivar invalid_event_number: the 0-based position of the faulty event,
        or L{None} when the error is not about one event.
    """

    def __init__(self, code: int, invalid_event_number: Optional[int] = None) -> None:
        super().__init__(HEC_ERRORS[code].text)
        self.code = code
        self.invalid_event_number = invalid_event_number

    @property
    def http_status(self) -> int:
        """
        The HTTP status HEC sends with this error.
        """
        return HEC_ERRORS[self.code].http_status

    def body(self) -> dict[str, Any]:
        """
        Return the JSON body HEC sends for this error.
        """
        return response_body(self.code, self.invalid_event_number)


def response_body(code: int, invalid_event_number: Optional[int] = None) -> dict[str, Any]:
    """
    Build the JSON body HEC sends for C{code}: C{{"text": ..., "code": ...}},
    plus C{"invalid-event-number"} for errors in a given event.

    @param code: a key of L{HEC_ERRORS}.
    @param invalid_event_number: the faulty event's position, if any.
    @return: the body as a dict, ready for C{json.dumps}.
    """
    body: dict[str, Any] = {"text": HEC_ERRORS[code].text, "code": code}
    if invalid_event_number is not None:
        body["invalid-event-number"] = invalid_event_number
    return body


_INT64_MAX = (1 << 63) - 1
_WHITESPACE = " \t\n\r"
_METADATA_FIELDS = ("host", "source", "sourcetype", "index")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _decode_text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise HecError(INVALID_DATA_FORMAT) from error


def _query_defaults(context: PayloadContext) -> dict[str, str]:
    defaults = {}
    for field in _METADATA_FIELDS:
        values = context.query.get(field)
        if values:
            defaults[field] = values[-1]
    return defaults


def split_events(text: str) -> list[Any]:
    """
    Split stacked JSON values (C{{...}{...} {...}}) with
    L{json.JSONDecoder.raw_decode}.

    @param text: the decoded body.
    @return: the JSON values in wire order.
    @raise HecError: code 5 when there is no value, code 6 when the text
        is not a sequence of JSON values.
    """
    values = []
    position = 0
    length = len(text)
    while True:
        while position < length and text[position] in _WHITESPACE:
            position += 1
        if position >= length:
            break
        try:
            value, position = _DECODER.raw_decode(text, position)
        except (ValueError, RecursionError) as error:
            raise HecError(INVALID_DATA_FORMAT, len(values)) from error
        values.append(value)
    if not values:
        raise HecError(NO_DATA)
    return values


def _time_to_nanoseconds(value: Any, position: int) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise HecError(INVALID_DATA_FORMAT, position)
    try:
        text = value.strip() if isinstance(value, str) else repr(value)
        exact = Decimal(text)
    except (InvalidOperation, ValueError) as error:
        raise HecError(INVALID_DATA_FORMAT, position) from error
    # Check the exponent before scaling: a string such as "1e999999999"
    # overflows the decimal context or makes an integer of a billion digits.
    if not exact.is_finite() or exact.adjusted() > 10:
        raise HecError(INVALID_DATA_FORMAT, position)
    nanoseconds = int(exact * 10**9)
    if abs(nanoseconds) > _INT64_MAX:
        raise HecError(INVALID_DATA_FORMAT, position)
    return nanoseconds


def _indexed_fields(value: Any, position: int) -> dict[str, str]:
    """
    Flatten HEC's indexed C{fields}: a flat object whose values are
    strings, numbers or lists of them (nested objects are code 15).
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HecError(INDEXED_FIELDS_ERROR, position)
    fields = {}
    for key, field_value in value.items():
        if isinstance(field_value, dict):
            raise HecError(INDEXED_FIELDS_ERROR, position)
        values = field_value if isinstance(field_value, list) else [field_value]
        parts = []
        for part in values:
            if isinstance(part, (dict, list)):
                raise HecError(INDEXED_FIELDS_ERROR, position)
            parts.append(part if isinstance(part, str) else json.dumps(part))
        fields[key] = ",".join(parts)
    return fields


def _event_item(event: Any, position: int, defaults: Mapping[str, str]) -> Item:
    if not isinstance(event, dict):
        raise HecError(INVALID_DATA_FORMAT, position)
    if "event" not in event:
        raise HecError(EVENT_FIELD_REQUIRED, position)
    payload = event["event"]
    if payload is None or payload == "" or (isinstance(payload, str) and not payload.strip()):
        raise HecError(EVENT_FIELD_BLANK, position)
    message = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    tags = _indexed_fields(event.get("fields"), position)
    metadata = dict(defaults)
    for field in _METADATA_FIELDS:
        value = event.get(field)
        if value is None:
            continue
        if not isinstance(value, str):
            raise HecError(INCORRECT_INDEX if field == "index" else INVALID_DATA_FORMAT, position)
        metadata[field] = value
    host = metadata.pop("host", None)
    tags.update(metadata)
    return Item(
        kind=LOG,
        index=position,
        timestamp_ns=_time_to_nanoseconds(event.get("time"), position),
        service=tags.get("service") or metadata.get("source"),
        host=host,
        message=message,
        tags=tags,
    )


def parse_event(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a C{/services/collector} or C{/services/collector/event} body:
    one L{LOG} item per stacked JSON event object (see the module
    docstring for the fields).

    @param body: the decoded request body.
    @param context: the request; its C{host}, C{source}, C{sourcetype}
        and C{index} query parameters are defaults.
    @return: the events in wire order.
    @raise HecError: with HEC's code: 5 no data, 6 invalid JSON or an
        event that is not an object, 12 no C{event} field, 13 a blank one,
        15 bad C{fields}.
    """
    defaults = _query_defaults(context)
    events = split_events(_decode_text(body))
    return ParsedPayload([_event_item(event, position, defaults) for position, event in enumerate(events)])


def parse_raw(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a C{/services/collector/raw} body: one L{LOG} item per non-empty
    line (C{\\n} or C{\\r\\n} separated), with the query parameters'
    metadata.  Raw events carry no time of their own.

    @param body: the decoded request body.
    @param context: the request; its C{host}, C{source}, C{sourcetype}
        and C{index} query parameters apply to every line.
    @return: the lines in wire order.
    @raise HecError: code 5 when no line has text, 6 when the body is
        not UTF-8.
    """
    defaults = _query_defaults(context)
    host = defaults.pop("host", None)
    lines = [line for line in _decode_text(body).splitlines() if line.strip()]
    if not lines:
        raise HecError(NO_DATA)
    return ParsedPayload(
        [
            Item(
                kind=LOG,
                index=position,
                service=defaults.get("source"),
                host=host,
                message=line,
                tags=dict(defaults),
            )
            for position, line in enumerate(lines)
        ]
    )


Parser = Callable[[bytes, PayloadContext], ParsedPayload]

#: Route-shape name to parser.
PARSERS: Mapping[str, Parser] = {"event": parse_event, "raw": parse_raw}

#: Request path to route-shape name.
ROUTES: Mapping[str, str] = {
    "/services/collector": "event",
    "/services/collector/1.0": "event",
    "/services/collector/event": "event",
    "/services/collector/event/1.0": "event",
    "/services/collector/raw": "raw",
    "/services/collector/raw/1.0": "raw",
}


def parse(body: bytes, context: PayloadContext) -> ParsedPayload:
    """
    Parse a payload with the parser for C{context.path} (see L{ROUTES}).

    @raise PayloadError: the path is not an HEC ingest route.
    @raise HecError: the payload is invalid.
    """
    shape = ROUTES.get(context.path.rstrip("/"))
    if shape is None:
        raise PayloadError("not a Splunk HEC ingest route")
    return PARSERS[shape](body, context)
