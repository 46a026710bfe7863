"""
JSON decoding for the payload parsers: orjson's speed with the results and
errors of the standard library's C{json.loads}.

L{loads} returns exactly what C{json.loads} returns and raises what it
raises.  orjson decodes first; C{json} decodes again where orjson refuses a
document or could have given a different result:

  - orjson rejects documents C{json} accepts: C{NaN} and C{Infinity},
    numbers too large for a double (C{1e400}, which C{json} makes an
    infinity), lone UTF-16 surrogates (escaped or encoded), a UTF-8 byte
    order mark and UTF-16 or UTF-32 bodies.  For those the result is what
    C{json} returns or raises (the parsers turn an error into a 400).
  - orjson turns an integer outside [-2**63, 2**64) into a float, where
    C{json} keeps the exact integer.  Such an integer has at least 19
    digits.  So when a document contains a run of 19 digits anywhere, its
    floats are checked, and one at or beyond those bounds sends it to
    C{json}.

Both keep the last value of a repeated key at the position of its first
occurrence, and both parse every other number to the same int or float.
NOTE: one difference remains.  orjson accepts nesting up to 1,024 levels,
while C{json} raises L{RecursionError} at Python's recursion limit (1,000
frames by default, less the caller's depth).  A document nested between
those depths now decodes instead of being rejected as invalid JSON.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import orjson

__all__ = ["loads"]

# Maps digits to "0" and every other byte to " ", so a run of 19 digits in
# the document becomes a run of 19 "0"s in the translation.
_DIGITS = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_STR_DIGITS = {code: "0" for code in range(0x30, 0x3A)}
_WIDE_RUN = b"0" * 19
_WIDE_RUN_TEXT = "0" * 19
# orjson's float for an integer below -2**63, or of 2**64 and above, is at
# or beyond these bounds, because rounding never moves it inside them.
_FLOAT_LOW = -float(1 << 63)
_FLOAT_HIGH = float(1 << 64)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def loads(data: Any, reject_constants: bool = False) -> Any:
    """
    Decode one JSON document as C{json.loads(data)} does.

    @param data: the document, as C{bytes}, C{bytearray} or C{str}.
    @param reject_constants: raise L{ValueError} for C{NaN}, C{Infinity}
        and C{-Infinity}, as C{json.loads} with a C{parse_constant} that
        raises does.
    @return: the decoded value.
    @raise ValueError: not valid JSON (C{json.JSONDecodeError}, or
        L{UnicodeDecodeError} for bytes that are not text).
    @raise RecursionError: nested deeper than C{json} can follow.
    """
    if isinstance(data, (bytes, bytearray, str)):
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
        else:
            if not _may_hold_wide_integer(data) or not _has_wide_float(document):
                return document
    if reject_constants:
        return json.loads(data, parse_constant=_reject_constant)
    return json.loads(data)


def _may_hold_wide_integer(data: Any) -> bool:
    """
    Tell whether C{data} contains a run of 19 or more digits (in numbers or
    strings alike), which every integer orjson cannot keep exact has.
    """
    if isinstance(data, str):
        return _WIDE_RUN_TEXT in data.translate(_STR_DIGITS)
    return _WIDE_RUN in bytes(data).translate(_DIGITS)


def _has_wide_float(document: Any) -> bool:
    """
    Tell whether a decoded document contains a float at or beyond the
    bounds of orjson's integers, which may be an integer C{json} keeps.
    """
    pending: list[Any] = [document]
    while pending:
        value: Optional[Any] = pending.pop()
        kind = type(value)
        if kind is float:
            if value <= _FLOAT_LOW or value >= _FLOAT_HIGH:
                return True
        elif kind is dict:
            pending.extend(value.values())
        elif kind is list:
            pending.extend(value)
    return False
