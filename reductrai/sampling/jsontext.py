"""
Helpers that cut JSON and line-based bodies into their elements' exact
source text, so a thinned payload keeps every kept element byte for byte.
"""

from __future__ import annotations

import json
from typing import Any

from reductrai.formats.items import PayloadError

_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"


def _skip(text: str, position: int) -> int:
    while position < len(text) and text[position] in _WHITESPACE:
        position += 1
    return position


def decode_text(body: bytes) -> str:
    """
    Decode a JSON or text body as UTF-8.

    @raise PayloadError: the body is not UTF-8.
    """
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("body is not UTF-8") from None


def array_elements(text: str) -> tuple[int, list[tuple[int, int]], int]:
    """
    Find the elements of a top-level JSON array.

    @param text: the document.
    @return: the position just after C{[}, the C{(start, end)} span of
        each element in order, and the position of the closing C{]}.
    @raise PayloadError: the document is not an array.
    """
    position = _skip(text, 0)
    if position >= len(text) or text[position] != "[":
        raise PayloadError("expected a JSON array")
    opened = position + 1
    position = _skip(text, opened)
    spans: list[tuple[int, int]] = []
    if position < len(text) and text[position] == "]":
        return opened, spans, position
    while True:
        try:
            _, end = _DECODER.raw_decode(text, position)
        except ValueError:
            raise PayloadError("invalid JSON array element") from None
        spans.append((position, end))
        position = _skip(text, end)
        if position < len(text) and text[position] == ",":
            position = _skip(text, position + 1)
            continue
        if position < len(text) and text[position] == "]":
            return opened, spans, position
        raise PayloadError("invalid JSON array")


def thin_array(text: str, keep: set[int]) -> str:
    """
    Return a top-level JSON array with only the elements at positions in
    C{keep}, each copied verbatim, joined by commas, with the text
    before the first element and from the closing bracket on unchanged.
    """
    opened, spans, closing = array_elements(text)
    kept = [text[start:end] for position, (start, end) in enumerate(spans) if position in keep]
    first = spans[0][0] if spans else opened
    return text[:first] + ",".join(kept) + text[closing:]


def stacked_values(text: str) -> list[tuple[int, int]]:
    """
    Find JSON values stacked one after the other (Splunk HEC events).

    @return: the C{(start, end)} span of each value.
    @raise PayloadError: the text is not a sequence of JSON values.
    """
    spans = []
    position = _skip(text, 0)
    while position < len(text):
        try:
            _, end = _DECODER.raw_decode(text, position)
        except ValueError:
            raise PayloadError("invalid stacked JSON") from None
        spans.append((position, end))
        position = _skip(text, end)
    return spans


def dumps_compact(document: Any) -> bytes:
    """
    Serialise a JSON document compactly, UTF-8, non-ASCII kept as is.
    """
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def loads(body: bytes) -> Any:
    """
    Decode a JSON body.

    @raise PayloadError: it is not JSON.
    """
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise PayloadError("invalid JSON") from None


def is_pretty(body: bytes) -> bool:
    """
    Tell whether a JSON body uses the default spacing of C{json.dumps}
    (C{", "} and C{": "}) rather than the compact form, so a rebuilt body
    can use the same style.
    """
    return b'": ' in body or b", " in body[:4096]


def dumps_like(document: Any, original: bytes) -> bytes:
    """
    Serialise C{document} in the spacing style of C{original}.
    """
    if is_pretty(original):
        return json.dumps(document, ensure_ascii=False).encode("utf-8")
    return dumps_compact(document)
