"""
Request-body content decoding with a cap on the decoded size.

L{decode_body} undoes an HTTP C{Content-Encoding} (or a chain of them) and
never lets a body grow past C{max_decoded_bytes}: every decoder produces its
output in bounded pieces and the cap is checked after each piece, and no
decoder allocates the size that a header inside the body declares.

Supported tokens (L{SUPPORTED_ENCODINGS}):

  - C{identity} (dropped by L{parse_content_encoding});
  - C{gzip}, C{x-gzip}: one or more concatenated gzip members;
  - C{deflate}: zlib-wrapped (RFC 1950, what Datadog and OpenTelemetry send)
    or raw (RFC 1951), distinguished by the zlib header;
  - C{zstd}, C{zstd1} (Datadog's name for an ordinary zstd frame): one or more
    concatenated frames, skippable frames allowed;
  - C{snappy}: the snappy block format (Prometheus remote write, Loki);
  - C{x-snappy-framed}: the snappy framing format;
  - C{lz4}: the LZ4 frame format, concatenated frames allowed;
  - C{br}: brotli.

Errors all derive from L{EncodingError}, whose C{reason} is safe to send to
the client: L{UnsupportedEncoding} (respond 415), L{DecodedTooLarge} (413) and
L{CorruptBody} (400).

NOTE on the libraries.  The C{Decompressor} classes of cramjam 2.14 are not
incremental: each C{decompress()} call must receive a complete stream (half a
gzip, lz4, brotli or framed-snappy stream raises), and none of them takes an
output limit.  So cramjam is used only where the size is known before
decoding:

  - snappy block: the format has no streaming form.  The varint preamble
    declares the exact decoded length, so it is read first and checked
    against the cap.  Only then does cramjam decode, and its output is
    exactly that length or it raises.
  - snappy framed: the chunk headers are walked without decoding; each data
    chunk's decoded size is known from its header (at most 64 KiB by the
    specification), so chunks are decoded by cramjam in groups of about
    1 MiB, with the cap checked before each group.  cramjam checks the
    CRC-32C of every chunk.

brotli uses Google's C{brotli} bindings (1.2 or later, for
C{output_buffer_limit}) and lz4 uses the C{lz4} package's
C{LZ4FrameDecompressor} (C{max_length}): both are truly incremental.

NOTE on zstd.  C{zstandard}'s C{decompressobj} reports the end of a frame
and what follows it (so truncation and trailing garbage are caught) but has
no output limit, and C{stream_reader} has an output limit but silently
accepts a truncated frame.  The decompressobj is therefore fed the input in
small slices: a zstd block decodes to at most 128 KiB and takes at least 4
bytes, so a slice of C{n} bytes yields at most C{n * 32 KiB + 128 KiB}, and
the slice size is chosen from the room left under the cap.  Each frame header
is read first: a declared content size over the cap, or a window larger than
the decoder allows, raises L{DecodedTooLarge} before anything is decoded.
"""

from __future__ import annotations

import struct
import zlib
from typing import Callable

import brotli
import cramjam
import lz4.frame
import zstandard

__all__ = [
    "OFFLOAD_BYTES",
    "CorruptBody",
    "DecodedTooLarge",
    "EncodingError",
    "SUPPORTED_ENCODINGS",
    "UnsupportedEncoding",
    "decode_body",
    "parse_content_encoding",
]


class EncodingError(Exception):
    """
    A request body could not be decoded.

    @ivar reason: a human-readable explanation, safe to send to the client
        (it contains no body bytes and no header other than the encoding name).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnsupportedEncoding(EncodingError):
    """
    Error for a content-encoding token this proxy cannot decode (respond 415).

    @ivar encoding: the offending token, lower-cased.
    """

    def __init__(self, encoding: str) -> None:
        printable = encoding if len(encoding) <= 64 else encoding[:64] + "..."
        super().__init__(f"unsupported content-encoding {printable!r}")
        self.encoding = encoding


class DecodedTooLarge(EncodingError):
    """
    Error for a decoded body that would exceed the cap (respond 413).

    @ivar limit: the cap, in bytes.
    @ivar encoding: the encoding whose output crossed the cap.
    """

    def __init__(self, encoding: str, limit: int, detail: str | None = None) -> None:
        reason = f"{encoding}-decoded body exceeds the limit of {limit} bytes"
        if detail:
            reason = f"{reason} ({detail})"
        super().__init__(reason)
        self.limit = limit
        self.encoding = encoding


class CorruptBody(EncodingError):
    """
    Error for a body that is not valid data for its declared encoding
    (respond 400).

    @ivar encoding: the encoding that failed.
    """

    def __init__(self, encoding: str, detail: str) -> None:
        super().__init__(f"invalid {encoding} body: {detail}")
        self.encoding = encoding


# Canonical decoder name of every accepted token.
_ALIASES: dict[str, str] = {
    "gzip": "gzip",
    "x-gzip": "gzip",
    "deflate": "deflate",
    "zstd": "zstd",
    "zstd1": "zstd",
    "snappy": "snappy",
    "x-snappy-framed": "x-snappy-framed",
    "lz4": "lz4",
    "br": "br",
}

SUPPORTED_ENCODINGS: frozenset[str] = frozenset(_ALIASES) | {"identity"}

#: Encoded bodies of at least this many bytes as received are worth decoding
#: in a thread.  Measured on the ingest path: a thread hop costs the reactor
#: thread about 20 microseconds, and inflating a 12 KiB gzip body (64 KiB of
#: JSON) inline costs it about 70; a 16 KiB body takes about 0.1 ms inline.
OFFLOAD_BYTES = 16 * 1024

# Max output requested from one decoder call. Small bodies still decode in a
# single call, and large ones in pieces of this size.
_STEP = 1 << 20


def parse_content_encoding(header: str | None) -> list[str]:
    """
    Split a C{Content-Encoding} header value into its tokens.

    Tokens are lower-cased and stripped, in header order (the order in which
    the encodings were applied); C{identity} and empty tokens are dropped.
    L{None} or an empty header gives C{[]}.  Unknown tokens are kept: it is
    L{decode_body} that rejects them.
    """
    if not header:
        return []
    tokens = []
    for raw in header.split(","):
        token = raw.strip().lower()
        if token and token != "identity":
            tokens.append(token)
    return tokens


class _Output:
    """
    Collects one decoder's output pieces and enforces the cap.
    """

    __slots__ = ("encoding", "limit", "parts", "size")

    def __init__(self, encoding: str, limit: int) -> None:
        self.encoding = encoding
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def room(self) -> int:
        """
        Return how many more bytes fit under the cap.
        """
        return self.limit - self.size

    def step(self) -> int:
        """
        Return how much output the next decoder call may produce: one byte
        more than fits (so that crossing the cap is seen), at most L{_STEP}.
        """
        return min(self.room() + 1, _STEP)

    def add(self, piece: bytes) -> None:
        """
        Append C{piece}; raise L{DecodedTooLarge} if the total passes the cap.
        """
        if not piece:
            return
        self.size += len(piece)
        if self.size > self.limit:
            self.parts.clear()
            raise DecodedTooLarge(self.encoding, self.limit)
        self.parts.append(piece)

    def result(self) -> bytes:
        """
        Return the decoded body, without a copy when it came in one piece.
        """
        if len(self.parts) == 1 and type(self.parts[0]) is bytes:
            return self.parts[0]
        return b"".join(self.parts)


# --- gzip and deflate -------------------------------------------------------

_GZIP_MAGIC = b"\x1f\x8b"


def _inflate(data: bytes, wbits: int, out: _Output) -> bytes:
    """
    Decode one zlib/gzip/raw-deflate stream from the start of C{data} into
    C{out}, in pieces of at most C{out.step()} bytes.

    @return: the bytes that follow the end of the stream.
    @raise CorruptBody: invalid or truncated stream.
    """
    decompressor = zlib.decompressobj(wbits)
    pending = data
    try:
        while True:
            step = out.step()
            piece = decompressor.decompress(pending, step)
            out.add(piece)
            pending = decompressor.unconsumed_tail
            if decompressor.eof:
                break
            if not pending and len(piece) < step:
                # All input consumed and nothing held back: the stream ends
                # before its end marker.
                break
    except zlib.error as error:
        raise CorruptBody(out.encoding, _zlib_detail(error)) from None
    if not decompressor.eof:
        raise CorruptBody(out.encoding, "truncated stream")
    return decompressor.unused_data


def _zlib_detail(error: zlib.error) -> str:
    """
    Return zlib's own explanation without the C{Error -3 while ...} prefix.
    """
    text = str(error)
    _, _, detail = text.partition(": ")
    return detail or text


def _decode_gzip(body: bytes, out: _Output) -> None:
    rest = body
    while True:
        rest = _inflate(rest, 16 + zlib.MAX_WBITS, out)
        if not rest:
            return
        if not rest.startswith(_GZIP_MAGIC):
            raise CorruptBody(out.encoding, "trailing data after the gzip stream")


def _looks_like_zlib(body: bytes) -> bool:
    """
    Tell whether C{body} starts with an RFC 1950 header (method 8, window at
    most 32 KiB, valid check bits, no preset dictionary).

    A raw deflate stream written by a real encoder never does: its first
    byte would be a stored block with non-zero padding bits.
    """
    if len(body) < 2:
        return False
    cmf, flg = body[0], body[1]
    return (
        cmf & 0x0F == 8
        and cmf >> 4 <= 7
        and (cmf << 8 | flg) % 31 == 0
        and not flg & 0x20
    )


def _decode_deflate(body: bytes, out: _Output) -> None:
    wbits = zlib.MAX_WBITS if _looks_like_zlib(body) else -zlib.MAX_WBITS
    if _inflate(body, wbits, out):
        raise CorruptBody(out.encoding, "trailing data after the deflate stream")


# --- zstd ---------------------------------------------------------------------

_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_SKIPPABLE_MASK = 0xFFFFFFF0
_ZSTD_SKIPPABLE_MAGIC = 0x184D2A50
# Largest frame header: magic 4 + descriptor 1 + window 1 + dictionary 4 +
# content size 8.
_ZSTD_MAX_HEADER = 18
# Output of one zstd block at most, and the least input a block takes.
_ZSTD_BLOCK_MAX = 128 * 1024
_ZSTD_MIN_FEED = 16


def _zstd_window_limit(limit: int) -> int:
    """
    Return the largest zstd window accepted for a cap of C{limit} bytes: a
    power of two between 8 MiB (the window of zstd level 19 for input of
    unknown size) and 128 MiB (zstd's own default decoder limit).
    """
    return 1 << max(23, min(27, (max(limit, 1) - 1).bit_length()))


def _zstd_check_header(view: memoryview, out: _Output, window_limit: int) -> None:
    """
    Read the header of the frame at the start of C{view}, and reject it if
    its declared content size or window would pass the limits.
    """
    try:
        params = zstandard.get_frame_parameters(view[:_ZSTD_MAX_HEADER])
    except zstandard.ZstdError:
        raise CorruptBody(out.encoding, "truncated or invalid frame header") from None
    if params.content_size != zstandard.CONTENTSIZE_UNKNOWN and params.content_size > out.room():
        raise DecodedTooLarge(
            out.encoding, out.limit, f"frame declares {params.content_size} bytes"
        )
    if params.window_size > window_limit:
        raise DecodedTooLarge(
            out.encoding,
            out.limit,
            f"frame window of {params.window_size} bytes exceeds {window_limit}",
        )


def _decode_zstd(body: bytes, out: _Output) -> None:
    window_limit = _zstd_window_limit(out.limit)
    context = zstandard.ZstdDecompressor(max_window_size=window_limit)
    view = memoryview(body)
    position = 0
    end = len(view)
    while position < end:
        if end - position < 4:
            raise CorruptBody(out.encoding, "trailing data after the zstd stream")
        (magic,) = struct.unpack_from("<I", view, position)
        if magic & _ZSTD_SKIPPABLE_MASK == _ZSTD_SKIPPABLE_MAGIC:
            if end - position < 8:
                raise CorruptBody(out.encoding, "truncated skippable frame")
            (size,) = struct.unpack_from("<I", view, position + 4)
            if end - position - 8 < size:
                raise CorruptBody(out.encoding, "truncated skippable frame")
            position += 8 + size
            continue
        if magic != _ZSTD_MAGIC:
            detail = "not a zstd frame" if position == 0 else "trailing data after the zstd stream"
            raise CorruptBody(out.encoding, detail)
        _zstd_check_header(view[position:], out, window_limit)
        position = _zstd_frame(context, view, position, out)


def _zstd_frame(
    context: zstandard.ZstdDecompressor, view: memoryview, position: int, out: _Output
) -> int:
    """
    Decode the zstd frame that starts at C{position}, feeding the decoder
    slices small enough that one call cannot produce much more than the room
    left under the cap.

    @return: the position just after the frame.
    """
    decompressor = context.decompressobj()
    end = len(view)
    try:
        while position < end:
            # A block that produces output takes at least 4 bytes, so a slice
            # of n bytes completes at most n / 4 + 1 blocks of 128 KiB each.
            feed = max(_ZSTD_MIN_FEED, (out.room() * 4) // _ZSTD_BLOCK_MAX // 2)
            chunk = view[position : position + feed]
            out.add(decompressor.decompress(chunk))
            if decompressor.eof:
                return position + len(chunk) - len(decompressor.unused_data)
            position += len(chunk)
    except zstandard.ZstdError as error:
        detail = str(error).removeprefix("zstd decompressor error: ")
        raise CorruptBody(out.encoding, detail) from None
    raise CorruptBody(out.encoding, "truncated frame")


# --- snappy -------------------------------------------------------------------

_SNAPPY_STREAM_ID = b"\xff\x06\x00\x00sNaPpY"
_SNAPPY_CHUNK_MAX = 65536


def _read_uvarint32(data: bytes | memoryview, offset: int, encoding: str) -> int:
    """
    Read the little-endian base-128 varint (at most 32 bits, 5 bytes) at
    C{offset}: the snappy block's uncompressed-length preamble.
    """
    value = 0
    for index in range(5):
        if offset + index >= len(data):
            raise CorruptBody(encoding, "truncated length preamble")
        byte = data[offset + index]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            if value > 0xFFFFFFFF:
                break
            return value
    raise CorruptBody(encoding, "invalid length preamble")


def _decode_snappy_block(body: bytes, out: _Output) -> None:
    declared = _read_uvarint32(body, 0, out.encoding)
    if declared > out.room():
        raise DecodedTooLarge(out.encoding, out.limit, f"block declares {declared} bytes")
    try:
        decoded = cramjam.snappy.decompress_raw(body)
    except cramjam.DecompressionError as error:
        raise CorruptBody(out.encoding, _cramjam_detail(error)) from None
    out.add(bytes(decoded))


def _cramjam_detail(error: Exception) -> str:
    return str(error).removeprefix("snappy: ")


def _decode_snappy_framed(body: bytes, out: _Output) -> None:
    view = memoryview(body)
    if not body.startswith(_SNAPPY_STREAM_ID):
        raise CorruptBody(out.encoding, "missing stream identifier")
    end = len(view)
    group_start = 0
    group_size = 0
    position = 0
    while position < end:
        if end - position < 4:
            raise CorruptBody(out.encoding, "truncated chunk header")
        kind = view[position]
        length = view[position + 1] | view[position + 2] << 8 | view[position + 3] << 16
        data_start = position + 4
        if end - data_start < length:
            raise CorruptBody(out.encoding, "truncated chunk")
        if kind == 0x00:
            if length < 5:
                raise CorruptBody(out.encoding, "compressed chunk too short")
            size = _read_uvarint32(view, data_start + 4, out.encoding)
        elif kind == 0x01:
            if length < 4:
                raise CorruptBody(out.encoding, "uncompressed chunk too short")
            size = length - 4
        elif kind == 0xFF:
            if view[position : data_start + length] != _SNAPPY_STREAM_ID:
                raise CorruptBody(out.encoding, "invalid stream identifier")
            size = 0
        elif kind <= 0x7F:
            raise CorruptBody(out.encoding, f"reserved unskippable chunk type {kind:#04x}")
        else:
            size = 0  # skippable chunk or padding
        if size > _SNAPPY_CHUNK_MAX:
            raise CorruptBody(out.encoding, "chunk larger than 65536 bytes")
        if group_size + size > out.room():
            raise DecodedTooLarge(out.encoding, out.limit)
        group_size += size
        position = data_start + length
        if group_size >= _STEP:
            _snappy_group(view[group_start:position], group_size, out)
            group_start, group_size = position, 0
    _snappy_group(view[group_start:end], group_size, out)


def _snappy_group(chunks: memoryview, size: int, out: _Output) -> None:
    """
    Decode a run of whole framed-snappy chunks whose decoded size, read from
    their headers, is C{size}.  cramjam checks each chunk's CRC-32C.
    """
    if size == 0:
        return
    try:
        decoded = cramjam.snappy.decompress(_SNAPPY_STREAM_ID + chunks)
    except cramjam.DecompressionError as error:
        raise CorruptBody(out.encoding, _cramjam_detail(error)) from None
    if len(decoded) != size:
        raise CorruptBody(out.encoding, "chunk length mismatch")
    out.add(bytes(decoded))


# --- lz4 ------------------------------------------------------------------------

_LZ4_MAGIC = 0x184D2204
_LZ4_SKIPPABLE_MASK = 0xFFFFFFF0
_LZ4_SKIPPABLE_MAGIC = 0x184D2A50


def _decode_lz4(body: bytes, out: _Output) -> None:
    rest: bytes = body
    while rest:
        if len(rest) < 4:
            raise CorruptBody(out.encoding, "trailing data after the lz4 stream")
        (magic,) = struct.unpack_from("<I", rest)
        if magic & _LZ4_SKIPPABLE_MASK == _LZ4_SKIPPABLE_MAGIC:
            if len(rest) < 8:
                raise CorruptBody(out.encoding, "truncated skippable frame")
            (size,) = struct.unpack_from("<I", rest, 4)
            if len(rest) - 8 < size:
                raise CorruptBody(out.encoding, "truncated skippable frame")
            rest = rest[8 + size :]
            continue
        if magic != _LZ4_MAGIC:
            detail = "not an lz4 frame" if rest is body else "trailing data after the lz4 stream"
            raise CorruptBody(out.encoding, detail)
        rest = _lz4_frame(rest, out)


def _lz4_frame(data: bytes, out: _Output) -> bytes:
    """
    Decode the lz4 frame at the start of C{data} in pieces of at most
    C{out.step()} bytes.

    @return: the bytes after the frame.
    """
    try:
        info = lz4.frame.get_frame_info(data)
    except (RuntimeError, ValueError):
        raise CorruptBody(out.encoding, "truncated or invalid frame header") from None
    if info["content_size"] > out.room():
        raise DecodedTooLarge(
            out.encoding, out.limit, f"frame declares {info['content_size']} bytes"
        )
    decompressor = lz4.frame.LZ4FrameDecompressor()
    pending = data
    try:
        while True:
            out.add(decompressor.decompress(pending, max_length=out.step()))
            pending = b""
            if decompressor.eof or decompressor.needs_input:
                break
    except (RuntimeError, ValueError) as error:
        detail = str(error).removeprefix("LZ4F_decompress failed with code: ")
        raise CorruptBody(out.encoding, detail) from None
    if not decompressor.eof:
        raise CorruptBody(out.encoding, "truncated frame")
    return decompressor.unused_data or b""


# --- brotli -------------------------------------------------------------------


def _decode_brotli(body: bytes, out: _Output) -> None:
    decompressor = brotli.Decompressor()
    try:
        # brotli may overshoot the limit by one internal buffer, so a limit of
        # a quarter step keeps each piece under the step.
        piece = decompressor.process(body, output_buffer_limit=max(1, out.step() // 4))
        out.add(piece)
        while not decompressor.is_finished() and piece:
            piece = decompressor.process(b"", output_buffer_limit=max(1, out.step() // 4))
            out.add(piece)
    except brotli.error:
        raise CorruptBody(out.encoding, "decoder failed") from None
    if not decompressor.is_finished():
        raise CorruptBody(out.encoding, "truncated stream")


# --- dispatch -----------------------------------------------------------------

_DECODERS: dict[str, Callable[[bytes, _Output], None]] = {
    "gzip": _decode_gzip,
    "deflate": _decode_deflate,
    "zstd": _decode_zstd,
    "snappy": _decode_snappy_block,
    "x-snappy-framed": _decode_snappy_framed,
    "lz4": _decode_lz4,
    "br": _decode_brotli,
}


def decode_body(body: bytes, content_encoding: str | None, max_decoded_bytes: int) -> bytes:
    """
    Undo the C{Content-Encoding} of a request body.

    The encodings of a chain are undone right to left (the last one applied
    first); every token is checked before any decoding starts.  The output of
    every stage, and so the result, is at most C{max_decoded_bytes} long.
    An identity body is returned as is (not copied) when it fits.

    @param body: the body as received.
    @param content_encoding: the header value, or L{None} when absent.
    @param max_decoded_bytes: the cap, in bytes (at least 0).
    @raise UnsupportedEncoding: a token is not in L{SUPPORTED_ENCODINGS}.
    @raise DecodedTooLarge: a stage's output would pass the cap.
    @raise CorruptBody: the body is not valid for its declared encoding:
        wrong magic, truncated stream, trailing data after a complete
        stream, failed checksum, or an empty body for a non-identity token
        (except C{x-snappy-framed}, whose writers encode an empty payload as
        no bytes at all).
    @raise ValueError: C{max_decoded_bytes} is negative.
    """
    if max_decoded_bytes < 0:
        raise ValueError("max_decoded_bytes must not be negative")
    tokens = parse_content_encoding(content_encoding)
    decoders = []
    for token in tokens:
        name = _ALIASES.get(token)
        if name is None:
            raise UnsupportedEncoding(token)
        decoders.append((token, _DECODERS[name]))
    data = body
    for token, decoder in reversed(decoders):
        if not data:
            if token == "x-snappy-framed":
                # cramjam's snappy framing writer emits no bytes at all for an
                # empty payload, so an empty body is a valid empty stream.
                continue
            raise CorruptBody(token, "empty body")
        out = _Output(token, max_decoded_bytes)
        decoder(data, out)
        data = out.result()
    if len(data) > max_decoded_bytes:
        raise DecodedTooLarge("identity", max_decoded_bytes)
    return data
