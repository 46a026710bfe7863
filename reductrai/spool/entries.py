"""
The stored form of spool entries and dead letters.

Three named databases of the store's environment hold the spool:

  - C{spool}: one value per undelivered request, keyed by its entry id;
  - C{spool_body}: the request body exactly as received (the wire body,
    still content-encoded), keyed by the same id;
  - C{spool_dead} and C{spool_dead_body}: dead letters and their bodies,
    keyed by the same id.

Entry id (20 bytes): an 8-byte upstream id (a hash of the upstream base
URL) followed by the 8-byte big-endian creation time in nanoseconds and a
4-byte sequence number, so that one cursor range holds one upstream's
entries in arrival order.  The top L{WORKER_BITS} bits of the sequence
number are the id of the worker process that created the entry, so that ids
stay unique when several processes write (C{server.workers}).

Entry value::

    version (1 byte, 1) | JSON length (4 bytes, big-endian) | JSON | sealed credentials

The JSON holds what may be shown (upstream, method, the redacted target,
attempts, times, sizes); the sealed part is the exact request-target and
header block, encrypted with the spool's L{KeyBox}.  A dead letter is the
same JSON with the reason added and the header block reduced to its
storable headers; it has no sealed part.

Body value: a flag byte (0 stored as is, 1 zstd frame) and the bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Optional

import attrs
import zstandard

SPOOL_DB = b"spool"
BODY_DB = b"spool_body"
DEAD_DB = b"spool_dead"
DEAD_BODY_DB = b"spool_dead_body"

UPSTREAM_ID_SIZE = 8
ENTRY_ID_SIZE = UPSTREAM_ID_SIZE + 12
_TIME = struct.Struct(">QI")
_PREFIX = struct.Struct(">BI")
_VERSION = 1
_RAW = 0
_ZSTD = 1
_COMPRESS_FROM = 512


class EntryError(ValueError):
    """
    A stored spool value is not valid.
    """


def upstream_id(base_url: str) -> bytes:
    """
    The 8-byte id of an upstream base URL, the prefix of its entry ids.
    """
    return hashlib.sha256(base_url.encode("utf-8")).digest()[:UPSTREAM_ID_SIZE]


#: Bits of an entry id's sequence number that count entries of one
#: worker; the bits above them hold the worker id.
SEQUENCE_BITS = 28
SEQUENCE_MASK = (1 << SEQUENCE_BITS) - 1
WORKER_BITS = 32 - SEQUENCE_BITS


def make_entry_id(upstream: bytes, time_ns: int, sequence: int, worker: int = 0) -> bytes:
    """
    Build an entry id; C{sequence} keeps its low L{SEQUENCE_BITS} bits and
    C{worker} fills the bits above them.
    """
    return upstream + _TIME.pack(time_ns, (worker << SEQUENCE_BITS) | (sequence & SEQUENCE_MASK))


def entry_worker(entry_id: bytes) -> int:
    """
    Return the id of the worker process that created an entry.
    """
    return _TIME.unpack_from(entry_id, UPSTREAM_ID_SIZE)[1] >> SEQUENCE_BITS


def entry_time_ns(entry_id: bytes) -> int:
    """
    The creation time encoded in an entry id.
    """
    return _TIME.unpack_from(entry_id, UPSTREAM_ID_SIZE)[0]


def entry_id_to_text(entry_id: bytes) -> str:
    return entry_id.hex()


def entry_id_from_text(text: str) -> bytes:
    """
    @raise ValueError: C{text} is not the hex form of an entry id.
    """
    try:
        value = bytes.fromhex(text.strip())
    except ValueError:
        value = b""
    if len(value) != ENTRY_ID_SIZE:
        raise ValueError(f"invalid spool entry id {text!r}; expected {2 * ENTRY_ID_SIZE} hexadecimal digits")
    return value


@attrs.define
class EntryMeta:
    """
    The visible part of an entry or dead letter.

    @ivar upstream: the upstream base URL.
    @ivar method: the HTTP method.
    @ivar display: the request-target with credentials removed.
    @ivar created_ns: creation (or re-queue) time, nanoseconds since the
        epoch; L{SpoolOptions.max_age} counts from it.
    @ivar attempts: delivery attempts so far.
    @ivar body_size: size of the wire body.
    @ivar reason: why a dead letter is dead, L{None} for a pending entry.
    @ivar status: the last upstream status, L{None} when none came.
    @ivar headers: storable headers, kept only by dead letters and by
        entries re-queued from them (which carry no sealed credentials).
    @ivar dead_ns: when the entry became a dead letter.
    """

    upstream: str
    method: str
    display: str
    created_ns: int
    attempts: int = 0
    body_size: int = 0
    reason: Optional[str] = None
    status: Optional[int] = None
    headers: Optional[list[list[str]]] = None
    dead_ns: Optional[int] = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}


def encode_entry(meta: EntryMeta, sealed: bytes = b"") -> bytes:
    text = json.dumps(meta.to_json(), separators=(",", ":")).encode("utf-8")
    return _PREFIX.pack(_VERSION, len(text)) + text + sealed


def decode_entry(value: bytes) -> tuple[EntryMeta, bytes]:
    """
    @return: the metadata and the sealed credentials (empty when none).
    @raise EntryError: the value is not an entry.
    """
    if len(value) < _PREFIX.size:
        raise EntryError("spool entry is truncated")
    version, length = _PREFIX.unpack_from(value)
    if version != _VERSION or _PREFIX.size + length > len(value):
        raise EntryError("spool entry has an unknown format or is truncated")
    try:
        meta = EntryMeta(**json.loads(bytes(value[_PREFIX.size : _PREFIX.size + length])))
    except (TypeError, ValueError) as error:
        raise EntryError(f"spool entry metadata is invalid: {error}") from None
    return meta, bytes(value[_PREFIX.size + length :])


def encode_credentials(target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """
    Serialise the exact request-target and header block for sealing.
    """
    document = {
        "t": target.decode("latin-1"),
        "h": [[name.decode("latin-1"), value.decode("latin-1")] for name, value in headers],
    }
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def decode_credentials(plaintext: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    document = json.loads(plaintext)
    return (
        document["t"].encode("latin-1"),
        [(name.encode("latin-1"), value.encode("latin-1")) for name, value in document["h"]],
    )


class BodyCodec:
    """
    Store wire bodies compressed with zstd when that saves at least a
    tenth; bodies already compressed by the client are kept as they are.
    Not thread-safe.
    """

    def __init__(self, level: int = 1) -> None:
        self._compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self._decompressor = zstandard.ZstdDecompressor()

    def encode(self, body: bytes) -> bytes:
        if len(body) >= _COMPRESS_FROM:
            frame = self._compressor.compress(body)
            if len(frame) * 10 < len(body) * 9:
                return bytes((_ZSTD,)) + frame
        return bytes((_RAW,)) + body

    def decode(self, value: bytes) -> bytes:
        """
        @raise EntryError: unknown flag or corrupt frame.
        """
        if not value:
            raise EntryError("spool body is empty")
        flag = value[0]
        if flag == _RAW:
            return bytes(value[1:])
        if flag == _ZSTD:
            try:
                return self._decompressor.decompress(bytes(value[1:]))
            except zstandard.ZstdError as error:
                raise EntryError(f"spool body is corrupt: {error}") from None
        raise EntryError(f"spool body has an unknown flag {flag}")
