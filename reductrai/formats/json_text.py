"""
JSON decoding for the payload parsers: orjson's speed with the results and
errors of the standard library's C{json.loads}.

L{loads} returns exactly what C{json.loads} returns and raises what it
raises.  orjson decodes first; C{json} decodes again where orjson refuses a
document or could have given a different result:

  - orjson rejects documents C{json} accepts: C{NaN} and C{Infinity},
    numbers too large for a double (C{1e400}, which C{json} makes an
    infinity), lone UTF-16 surrogates (escaped or encoded), a UTF-8 byte
    order mark and UTF-16 or UTF-32 bodies.  Whatever C{json} makes of those
    (a value, or the error the parser turns into a 400) is the answer.
  - orjson turns an integer outside [-2**63, 2**64) into a float, where
    C{json} keeps the exact integer.  Such an integer has at least 19
    digits, so a document holding a run of 19 digits anywhere has its
    floats checked, and one at or beyond those bounds sends it to C{json}.

Both keep the last value of a repeated key at the position of its first
occurrence, and both parse every other number to the same int or float.
One difference remains: orjson accepts nesting up to 1,024 levels, where
C{json} stops at Python's recursion limit (about 1,000 frames, less the
caller's depth).
"""

from __future__ import annotations

import json
from typing import Any, Optional

import orjson

__all__ = ["loads"]

# Digits to "0" and everything else to " ": a run of 19 digits in the
# document becomes a run of 19 "0"s in the translation.
_DIGITS = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_STR_DIGITS = {code: "0" for code in range(0x30, 0x3A)}
_WIDE_RUN = b"0" * 19
_WIDE_RUN_TEXT = "0" * 19
# orjson's float for an integer below -2**63 or from 2**64 up is at or
# beyond these bounds (the rounding goes no further in).
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
    Tell whether C{data} holds a run of 19 or more digits (in numbers or
    strings alike): an integer orjson cannot keep exact has one.
    """
    if isinstance(data, str):
        return _WIDE_RUN_TEXT in data.translate(_STR_DIGITS)
    return _WIDE_RUN in bytes(data).translate(_DIGITS)


def _has_wide_float(document: Any) -> bool:
    """
    Tell whether a decoded document holds a float at or beyond the bounds
    of orjson's integers, which may stand for an integer C{json} keeps.
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
