"""
The stored form of one request.

Key: 12 bytes, the arrival time in nanoseconds since the epoch (unsigned
64-bit big-endian) followed by a 32-bit big-endian sequence number, so that
keys sort by arrival and never collide within one process.

Value::

    version (1 byte, 1) | header length (4 bytes, big-endian) | header | body

The header is compact UTF-8 JSON (see L{RecordHeader}); the body is one zstd
frame of the decoded request body, with the frame's content size and
checksum set.  Credentials never reach either part: the caller removes them
from headers, query and path before building the header.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any, Optional

import attrs
import zstandard

FORMAT_VERSION = 1
_PREFIX = struct.Struct(">BI")
_KEY = struct.Struct(">QI")
KEY_SIZE = _KEY.size


class RecordError(ValueError):
    """
    A stored value is not a valid record (wrong version, truncated, or a
    checksum mismatch).
    """


def make_key(time_ns: int, sequence: int) -> bytes:
    """
    Build a record key from its arrival time and sequence number.
    """
    return _KEY.pack(time_ns, sequence & 0xFFFFFFFF)


def split_key(key: bytes) -> tuple[int, int]:
    """
    Return C{(time_ns, sequence)} of a record key.
    """
    if len(key) != KEY_SIZE:
        raise RecordError(f"record key has {len(key)} bytes, expected {KEY_SIZE}")
    return _KEY.unpack(key)


def key_to_text(key: bytes) -> str:
    """
    Format a key for people and URLs: C{<time_ns>-<sequence>}.
    """
    time_ns, sequence = split_key(key)
    return f"{time_ns}-{sequence}"


def key_from_text(text: str) -> bytes:
    """
    Parse the form L{key_to_text} prints.

    @raise ValueError: C{text} is not such a key.
    """
    time_part, _, sequence_part = text.partition("-")
    try:
        return make_key(int(time_part), int(sequence_part or "0"))
    except (ValueError, struct.error):
        raise ValueError(f"invalid record key {text!r}; expected <time_ns>-<sequence>") from None


@attrs.frozen
class RecordHeader:
    """
    Metadata of a stored request.

    @ivar received_ns: arrival time, nanoseconds since the epoch.
    @ivar vendor: vendor name (C{"datadog"}).
    @ivar kind: route kind (C{"metrics"}, C{"logs"}, ...).
    @ivar route: route name within the vendor (C{"series_v2"}).
    @ivar method: HTTP method.
    @ivar path: request path, with any credential segment replaced by
        C{"<redacted>"}.
    @ivar query: query string without credential parameters.
    @ivar content_type: the request's C{Content-Type}, or L{None}.
    @ivar content_encoding: the request's C{Content-Encoding} as received,
        or L{None}; the stored body is always decoded.
    @ivar wire_size: body size as received.
    @ivar size: decoded body size.
    @ivar crc32: CRC-32 of the decoded body.
    @ivar headers: other end-to-end request headers as C{[name, value]}
        pairs, without credentials.
    """

    received_ns: int
    vendor: str
    kind: str
    route: str
    method: str
    path: str
    query: str
    content_type: Optional[str]
    content_encoding: Optional[str]
    wire_size: int
    size: int
    crc32: int
    headers: list[list[str]] = attrs.field(factory=list)

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


class RecordCodec:
    """
    Encode and decode record values with reusable zstd contexts.

    Not thread-safe: each thread uses its own codec.
    """

    def __init__(self, level: int = 3) -> None:
        self._compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
        self._decompressor = zstandard.ZstdDecompressor()

    def encode(self, header: RecordHeader, body: bytes) -> bytes:
        """
        Build the stored value of a record.
        """
        header_bytes = json.dumps(attrs.asdict(header), separators=(",", ":")).encode("utf-8")
        return b"".join(
            (_PREFIX.pack(FORMAT_VERSION, len(header_bytes)), header_bytes, self._compressor.compress(body))
        )

    def decode_header(self, value: bytes) -> RecordHeader:
        """
        Read only the header of a stored value.

        @raise RecordError: the value is not a valid record.
        """
        header, _ = self._split(value)
        return header

    def decode(self, value: bytes) -> tuple[RecordHeader, bytes]:
        """
        Read a stored value: its header and the decoded body, checked
        against the header's size and CRC-32.

        @raise RecordError: the value is not a valid record or its body does
            not match its checksum.
        """
        header, offset = self._split(value)
        frame = memoryview(value)[offset:]
        try:
            body = self._decompressor.decompress(frame, max_output_size=header.size)
        except zstandard.ZstdError as error:
            raise RecordError(f"stored body is corrupt: {error}") from None
        if len(body) != header.size or zlib.crc32(body) != header.crc32:
            raise RecordError("stored body does not match its checksum")
        return header, body

    def _split(self, value: bytes) -> tuple[RecordHeader, int]:
        if len(value) < _PREFIX.size:
            raise RecordError("record is truncated")
        version, header_length = _PREFIX.unpack_from(value)
        if version != FORMAT_VERSION:
            raise RecordError(f"unknown record format version {version}")
        end = _PREFIX.size + header_length
        if end > len(value):
            raise RecordError("record header is truncated")
        try:
            fields = json.loads(bytes(value[_PREFIX.size : end]))
            header = RecordHeader(**fields)
        except (ValueError, TypeError) as error:
            raise RecordError(f"record header is invalid: {error}") from None
        return header, end
