"""
The stored form of one request.

Key: 12 bytes, the arrival time in nanoseconds since the epoch (unsigned
64-bit big-endian) followed by a 32-bit big-endian sequence number, so that
keys sort by arrival and never collide within one process.

Value (format version 2, written)::

    version (1 byte, 2) | dictionary (varint) | zstd frame

The frame, with its content size and checksum set, holds::

    header length (varint) | header | body

The header is compact UTF-8 JSON (see L{RecordHeader}); the body is the
decoded request body.  C{dictionary} is 0 when the frame was compressed
without a dictionary, else the trained dictionary's id plus 1 (see
L{reductrai.dictionaries}), which must match the header's C{dictionary}.
The header shares the frame, and dictionaries are trained on samples that
begin with headers (L{record_sample}).  Headers of one stream differ in a
few fields, so most of a header's JSON (a few hundred bytes) compresses to
dictionary matches.  The cost is on reading: a header read decompresses
the frame.

Version 1 values, still read::

    version (1 byte, 1) | header length (4 bytes, big-endian) | header | zstd frame of the body

Varints are unsigned LEB128.

Packed records live in blocks instead (see L{encode_block}): one zstd frame
holding many records of one stream (vendor and kind), each with its key,
its header and its decoded body.  Credentials never reach either part: the caller removes them
from headers, query and path before building the header.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import attrs
import zstandard

#: The record format version L{RecordCodec.encode} writes.
FORMAT_VERSION = 2
#: The version of values whose header is outside the frame, still read.
FORMAT_VERSION_1 = 1
_PREFIX_V1 = struct.Struct(">BI")
#: A header read decompresses a frame whole when its content is at most
#: this large, and only the frame's first bytes when it is larger.
HEADER_READ_WHOLE_BYTES = 256 * 1024
_HEADER_PROBE_BYTES = 4096
_KEY = struct.Struct(">QI")
KEY_SIZE = _KEY.size


class RecordError(ValueError):
    """
    A stored value is not a valid record (wrong version, truncated, or a
    checksum mismatch).
    """


#: Arrival times in record keys are whole multiples of this (1 ms).
KEY_TIME_UNIT_NS = 1_000_000


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
    dictionary: Optional[int] = None
    items: Optional[int] = None
    item_min_ns: Optional[int] = None
    item_max_ns: Optional[int] = None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @property
    def stream(self) -> str:
        """
        The stream this record belongs to: C{"<vendor>/<kind>"}.
        """
        return f"{self.vendor}/{self.kind}"


_OPTIONAL_FIELDS = ("dictionary", "items", "item_min_ns", "item_max_ns")


_HEADER_FIELD_NAMES = tuple(field.name for field in attrs.fields(RecordHeader))
_HEADER_ENCODER = json.JSONEncoder(separators=(",", ":"))
_HEADER_DECODER = json.JSONDecoder()


def _make_header_encoder() -> Callable[[dict], str]:
    # json's C encoder, built once: JSONEncoder.encode builds one on every
    # call, about 1 us of the 4 a header costs.  It is used only when it
    # writes what JSONEncoder writes.
    try:
        from json.encoder import c_make_encoder, encode_basestring_ascii

        iterencode = c_make_encoder(
            None, _HEADER_ENCODER.default, encode_basestring_ascii, None, ":", ",", False, False, True
        )

        def encode(fields: dict) -> str:
            return "".join(iterencode(fields, 0))

        probe = {"n": 2**63, "s": "caf\u00e9 \"q\"", "l": [["a", "b"]], "z": None, "f": 1.5, "t": True}
        if encode(probe) == _HEADER_ENCODER.encode(probe):
            return encode
    except (ImportError, TypeError):
        pass
    return _HEADER_ENCODER.encode


_encode_header = _make_header_encoder()


def header_bytes(header: RecordHeader) -> bytes:
    """
    Serialise a header as compact JSON, leaving out optional fields that
    are unset.
    """
    # Plain attribute reads: attrs.asdict copies every nested list, which
    # showed in the ingest profile.
    fields = {name: getattr(header, name) for name in _HEADER_FIELD_NAMES}
    for name in _OPTIONAL_FIELDS:
        if fields[name] is None:
            del fields[name]
    return _encode_header(fields).encode("utf-8")


def parse_header(data: bytes) -> RecordHeader:
    """
    Read a header serialised by L{header_bytes}.

    @raise RecordError: not a valid header.
    """
    try:
        # The header is UTF-8 by definition: decoding it directly skips
        # json.loads' encoding detection, a visible part of a header read.
        return RecordHeader(**_HEADER_DECODER.decode(str(data, "utf-8")))
    except (ValueError, TypeError) as error:
        raise RecordError(f"record header is invalid: {error}") from None


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data, offset: int, field: str) -> tuple[int, int]:
    # Return (value, offset after it) of the varint at offset in data.
    result = shift = 0
    while True:
        if offset >= len(data) or shift > 63:
            raise RecordError(f"record {field} is truncated")
        byte = data[offset]
        offset += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, offset
        shift += 7


_V2_PREFIXES = [bytes((FORMAT_VERSION, n)) for n in range(0x80)]


def record_prefix(dictionary: Optional[int]) -> bytes:
    """
    Return the bytes before the frame of a version 2 value.

    @param dictionary: the id of the dictionary the frame was compressed
        with, or L{None}.
    """
    coded = 0 if dictionary is None else dictionary + 1
    if coded < 0x80:
        return _V2_PREFIXES[coded]
    return bytes((FORMAT_VERSION,)) + _varint(coded)


def record_content(head: bytes, body: bytes) -> bytes:
    """
    Return what the frame of a version 2 value holds: the header length,
    the header bytes (L{header_bytes}) and the body.
    """
    return b"".join((_varint(len(head)), head, body))


def record_sample(head: bytes, body: bytes, limit: int) -> bytes:
    """
    Return a dictionary training sample for a record: the first C{limit}
    bytes of its frame content (L{record_content}), so that the dictionary
    learns the header as well as the start of the body.
    """
    prefix = _varint(len(head))
    room = limit - len(prefix) - len(head)
    if room <= 0:
        return (prefix + head)[:limit]
    return b"".join((prefix, head, body[:room]))


class RecordCodec:
    """
    Encode and decode record values with reusable zstd contexts.

    Not thread-safe: each thread uses its own codec.

    Reading the header of a version 2 value decompresses its frame; the
    codec keeps the last frame content it decompressed whole, so that
    L{decode} of the value L{decode_header} just read (the same object)
    does not decompress it again.

    @ivar dictionary_lookup: called with a dictionary id, returns the
        dictionary's bytes or L{None} when unknown; records compressed with
        a dictionary need it.
    """

    def __init__(self, level: int = 3, dictionary_lookup: Optional[Callable[[int], Optional[bytes]]] = None) -> None:
        self._compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
        self._decompressor = zstandard.ZstdDecompressor()
        self._dictionary_decompressors: dict[int, zstandard.ZstdDecompressor] = {}
        self.dictionary_lookup = dictionary_lookup
        self._last: Optional[tuple[bytes, RecordHeader, bytes, int]] = None

    def encode(self, header: RecordHeader, body: bytes, compressor: Optional[zstandard.ZstdCompressor] = None) -> bytes:
        """
        Build the stored value of a record (format version 2).

        @param compressor: the compressor to use instead of the plain one,
            one built on the dictionary C{header.dictionary} names
            (L{reductrai.dictionaries.dictionary_compressor}).
        """
        return self.encode_head(header_bytes(header), header.dictionary, body, compressor)

    def encode_head(
        self,
        head: bytes,
        dictionary: Optional[int],
        body: bytes,
        compressor: Optional[zstandard.ZstdCompressor] = None,
    ) -> bytes:
        """
        Build the stored value of a record whose header is already
        serialised.

        @param head: L{header_bytes} of the record's header.
        @param dictionary: the header's C{dictionary}.
        @param compressor: as for L{encode}.
        """
        frame = (compressor or self._compressor).compress(record_content(head, body))
        return record_prefix(dictionary) + frame

    def encode_v1(self, header: RecordHeader, body: bytes, compressor: Optional[zstandard.ZstdCompressor] = None) -> bytes:
        """
        Build a format version 1 value, as older stores contain.  Tests and
        tools use it to build such values.
        """
        head = header_bytes(header)
        frame = (compressor or self._compressor).compress(body)
        return b"".join((_PREFIX_V1.pack(FORMAT_VERSION_1, len(head)), head, frame))

    def _decompressor_for(self, dictionary: Optional[int]) -> zstandard.ZstdDecompressor:
        if dictionary is None:
            return self._decompressor
        found = self._dictionary_decompressors.get(dictionary)
        if found is None:
            data = self.dictionary_lookup(dictionary) if self.dictionary_lookup else None
            if data is None:
                raise RecordError(f"record needs dictionary {dictionary}, which the store does not hold")
            found = zstandard.ZstdDecompressor(dict_data=zstandard.ZstdCompressionDict(data))
            self._dictionary_decompressors[dictionary] = found
        return found

    def decode_header(self, value: bytes) -> RecordHeader:
        """
        Read only the header of a stored value.  For version 2 this
        decompresses the frame: whole, checksum included, up to
        L{HEADER_READ_WHOLE_BYTES} of content, else only its beginning.

        @raise RecordError: the value is not a valid record.
        """
        last = self._last
        if last is not None and last[0] is value:
            return last[1]
        dictionary, frame = self._frame(value)
        if frame is None:
            header, _ = self._split_v1(value)
            return header
        try:
            size = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as error:
            raise RecordError(f"stored record is corrupt: {error}") from None
        if 0 <= size <= HEADER_READ_WHOLE_BYTES:
            return self._decode_v2(value, dictionary, frame, True)[0]
        return self._header_only(dictionary, frame)

    def decode(self, value: bytes) -> tuple[RecordHeader, bytes]:
        """
        Read a stored value: its header and the decoded body, checked
        against the header's size and CRC-32.

        @raise RecordError: the value is not a valid record or its body does
            not match its checksum.
        """
        last = self._last
        if last is not None and last[0] is value:
            header, content, offset = last[1], last[2], last[3]
        else:
            dictionary, frame = self._frame(value)
            if frame is None:
                return self._decode_v1(value)
            header, content, offset = self._decode_v2(value, dictionary, frame, False)
        body = content[offset:]
        if len(body) != header.size or zlib.crc32(body) != header.crc32:
            raise RecordError("stored body does not match its checksum")
        return header, body

    def _frame(self, value: bytes) -> tuple[Optional[int], Optional[memoryview]]:
        # Return the dictionary and the frame of a version 2 value, or
        # (None, None) for a version 1 value.
        if len(value) < 2:
            raise RecordError("record is truncated")
        version = value[0]
        if version != FORMAT_VERSION:
            if version == FORMAT_VERSION_1:
                return None, None
            raise RecordError(f"unknown record format version {version}")
        coded = value[1]
        offset = 2
        if coded >= 0x80:
            coded, offset = _read_varint(value, 1, "prefix")
        return (None if coded == 0 else coded - 1), memoryview(value)[offset:]

    def _decode_v2(
        self, value: bytes, dictionary: Optional[int], frame: memoryview, remember: bool
    ) -> tuple[RecordHeader, bytes, int]:
        # Decompress the whole frame, which checks its checksum.  With
        # remember, keep the result for a decode of the same value.
        try:
            content = self._decompressor_for(dictionary).decompress(frame)
        except zstandard.ZstdError as error:
            raise RecordError(f"stored record is corrupt: {error}") from None
        header, offset = self._parse_content(content, dictionary)
        self._last = (value, header, content, offset) if remember else None
        return header, content, offset

    def _header_only(self, dictionary: Optional[int], frame: memoryview) -> RecordHeader:
        decompressor = self._decompressor_for(dictionary)
        try:
            with decompressor.stream_reader(frame) as reader:
                content = reader.read(_HEADER_PROBE_BYTES)
                length, offset = _read_varint(content, 0, "header")
                while len(content) < offset + length:
                    more = reader.read(offset + length - len(content))
                    if not more:
                        raise RecordError("record header is truncated")
                    content += more
        except zstandard.ZstdError as error:
            raise RecordError(f"stored record is corrupt: {error}") from None
        return self._parse_content(content, dictionary)[0]

    def _parse_content(self, content: bytes, dictionary: Optional[int]) -> tuple[RecordHeader, int]:
        # Inline reads of 1- and 2-byte lengths (headers up to 16,383
        # bytes): a header read is on the path of every scan.
        if content and content[0] < 0x80:
            length, offset = content[0], 1
        elif len(content) >= 2 and content[1] < 0x80:
            length, offset = (content[0] & 0x7F) | (content[1] << 7), 2
        else:
            length, offset = _read_varint(content, 0, "header")
        end = offset + length
        if end > len(content):
            raise RecordError("record header is truncated")
        header = parse_header(content[offset:end])
        if header.dictionary != dictionary:
            raise RecordError("record header does not name the dictionary its frame was compressed with")
        return header, end

    def _decode_v1(self, value: bytes) -> tuple[RecordHeader, bytes]:
        header, offset = self._split_v1(value)
        frame = memoryview(value)[offset:]
        try:
            body = self._decompressor_for(header.dictionary).decompress(frame, max_output_size=header.size)
        except zstandard.ZstdError as error:
            raise RecordError(f"stored body is corrupt: {error}") from None
        if len(body) != header.size or zlib.crc32(body) != header.crc32:
            raise RecordError("stored body does not match its checksum")
        return header, body

    def _split_v1(self, value: bytes) -> tuple[RecordHeader, int]:
        if len(value) < _PREFIX_V1.size:
            raise RecordError("record is truncated")
        version, header_length = _PREFIX_V1.unpack_from(value)
        end = _PREFIX_V1.size + header_length
        if end > len(value):
            raise RecordError("record header is truncated")
        return parse_header(bytes(value[_PREFIX_V1.size : end])), end


_DERIVED_FIELDS = ("received_ns", "size", "crc32")


def packed_header_bytes(header: RecordHeader) -> bytes:
    """
    Serialise a header for a block: without the fields a block derives
    (arrival time from the key, size and CRC-32 from the body, which the
    block's own checksums protect), since they vary with every record and
    would cost the block most of what it saves.
    """
    fields = json.loads(header_bytes(header))
    for name in _DERIVED_FIELDS:
        fields.pop(name, None)
    return json.dumps(fields, separators=(",", ":")).encode("utf-8")


def parse_packed_header(
    data: bytes, key: bytes, body: bytes, item_times: bool = True, derive: Optional[ItemTimesDeriver] = None
) -> RecordHeader:
    """
    Read a header written by L{packed_header_bytes} or L{decode_block}
    for the record C{key} with the decoded C{body}.

    @param item_times: restore an item time range that its block left to
        be recomputed (L{BLOCK_DERIVED_ITEM_TIMES}), which parses the body;
        with C{False} such a header has none.
    @param derive: what recomputes it; by default the ingest parsers
        (L{reductrai.itemtimes.derive_item_times}).
    @raise RecordError: not a valid header, or its item time range cannot
        be recomputed.
    """
    try:
        fields = json.loads(data)
        fields.setdefault("received_ns", split_key(key)[0])
        fields.setdefault("size", len(body))
        fields.setdefault("crc32", zlib.crc32(body))
        if fields.pop(_DERIVED_MARK, None) and item_times:
            times_of = (derive or _default_deriver())(fields, body)
            if times_of is None:
                raise RecordError("record item times cannot be recomputed from its body")
            if times_of[0] is not None:
                fields["item_min_ns"] = times_of[0]
            if times_of[1] is not None:
                fields["item_max_ns"] = times_of[1]
        return RecordHeader(**fields)
    except (ValueError, TypeError) as error:
        raise RecordError(f"record header is invalid: {error}") from None


_BLOCK_MAGIC = b"RBK2"
_BLOCK_COUNT = struct.Struct(">4sI")


def encode_block(entries: list[tuple[bytes, bytes, bytes]]) -> bytes:
    """
    Lay out records for packing, before compression (block version 2,
    kept so that tests can build the blocks older stores hold; the
    compactor writes L{encode_block_v3}).

    The layout is columnar so that one zstd frame finds the repetition in
    each column: arrival-time deltas, sequence numbers, header lengths,
    body lengths, then every header, then every body::

        "RBK2" | count (4) | count * time delta (8) | count * sequence (4)
        | count * header length (4) | count * body length (4)
        | headers... | bodies...

    The first time delta is from 0, so it is the first record's time.

    @param entries: C{(key, header bytes, decoded body)} in key order.
    @return: the uncompressed block.
    """
    count = len(entries)
    times, sequences = [], []
    previous = 0
    for key, _, _ in entries:
        time_ns, sequence = _KEY.unpack(key)
        times.append(time_ns - previous)
        sequences.append(sequence)
        previous = time_ns
    parts = [
        _BLOCK_COUNT.pack(_BLOCK_MAGIC, count),
        struct.pack(f">{count}Q", *times),
        struct.pack(f">{count}I", *sequences),
        struct.pack(f">{count}I", *(len(head) for _, head, _ in entries)),
        struct.pack(f">{count}I", *(len(body) for _, _, body in entries)),
    ]
    return b"".join(parts + [head for _, head, _ in entries] + [body for _, _, body in entries])


def decode_block(data: bytes) -> Iterator[tuple[bytes, bytes, bytes]]:
    """
    Yield C{(key, header bytes, body)} of an uncompressed block built by
    L{encode_block_v3} or L{encode_block} (version 2, still read), in key
    order.  Header bytes are JSON for L{parse_packed_header}, which also
    recomputes the item time ranges a block flagged
    L{BLOCK_DERIVED_ITEM_TIMES} left out.

    @raise RecordError: the block is malformed.
    """
    if len(data) < _BLOCK_COUNT.size:
        raise RecordError("block is truncated")
    magic, count = _BLOCK_COUNT.unpack_from(data)
    if magic == _BLOCK_MAGIC_V3:
        yield from _decode_block_v3(data)
        return
    if magic != _BLOCK_MAGIC:
        raise RecordError("block has an unknown format")
    offset = _BLOCK_COUNT.size
    if offset + count * 20 > len(data):
        raise RecordError("block table is truncated")
    times = struct.unpack_from(f">{count}Q", data, offset)
    offset += 8 * count
    sequences = struct.unpack_from(f">{count}I", data, offset)
    offset += 4 * count
    header_lengths = struct.unpack_from(f">{count}I", data, offset)
    offset += 4 * count
    body_lengths = struct.unpack_from(f">{count}I", data, offset)
    offset += 4 * count
    body_offset = offset + sum(header_lengths)
    if body_offset + sum(body_lengths) != len(data):
        raise RecordError("block lengths do not add up")
    view = memoryview(data)
    time_ns = 0
    for delta, sequence, header_length, body_length in zip(times, sequences, header_lengths, body_lengths):
        time_ns += delta
        yield (
            _KEY.pack(time_ns, sequence),
            bytes(view[offset : offset + header_length]),
            bytes(view[body_offset : body_offset + body_length]),
        )
        offset += header_length
        body_offset += body_length


_BLOCK_MAGIC_V3 = b"RBK3"
_BLOCK_V3_HEAD = struct.Struct(">4sBI")
#: Block flag: the block holds a CRC-32 column, one per record.
BLOCK_RECORD_CHECKSUMS = 0x01
#: Block flag: the time and item time columns are divided by a scale (a
#: varint before each of them), the greatest common divisor of their
#: values: whole-millisecond arrival times then cost about 10 bits a record
#: where their nanosecond form costs 30.
BLOCK_SCALED_TIMES = 0x02
#: Block flag: the item time columns are empty; reading the block
#: recomputes each record's item time range from its body
#: (L{reductrai.itemtimes}).  The compactor sets it only when that
#: reproduces every record's range exactly.
BLOCK_DERIVED_ITEM_TIMES = 0x04
_BLOCK_FLAGS = BLOCK_RECORD_CHECKSUMS | BLOCK_SCALED_TIMES | BLOCK_DERIVED_ITEM_TIMES

#: Recomputes a record's C{(item_min_ns, item_max_ns)} from its header
#: fields and body, or returns L{None} when it cannot.
ItemTimesDeriver = Callable[[Mapping, bytes], Optional[tuple[Optional[int], Optional[int]]]]


#: The header field that marks an item time range left to be recomputed.
_DERIVED_MARK = "item_times_derived"


def _default_deriver() -> ItemTimesDeriver:
    # Imported on first use: the parsers behind it import this module's
    # neighbours, and most readers never meet a derived block.
    from reductrai.itemtimes import derive_item_times

    return derive_item_times
#: Header fields a version 3 block keeps in columns instead of in the
#: deduplicated header shapes, because they vary from record to record.
_COLUMN_FIELDS = ("received_ns", "size", "crc32", "wire_size", "items", "item_min_ns", "item_max_ns")


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _zigzag(value: int) -> int:
    return value * 2 if value >= 0 else -value * 2 - 1


def _unzigzag(value: int) -> int:
    return value >> 1 if not value & 1 else -((value + 1) >> 1)


def _optional(value: Optional[int], base: int) -> int:
    # 0 is an unset field, any other value is 1 + the zigzag offset from base.
    return 0 if value is None else 1 + _zigzag(value - base)


def _from_optional(coded: int, base: int, scale: int = 1) -> Optional[int]:
    return None if coded == 0 else base + _unzigzag(coded - 1) * scale


def _scale_of(values: Iterable[Optional[int]]) -> int:
    # The greatest common divisor of the set values, 1 when there is none.
    scale = 0
    for value in values:
        if value:
            scale = math.gcd(scale, value)
            if scale == 1:
                break
    return scale or 1


def _planes(values: list[int]) -> bytes:
    # A column is its width in bytes (1 byte), then its byte planes, most
    # significant first. Random low bytes then stay apart from near-constant high bytes.
    width = max(1, (max(values, default=0).bit_length() + 7) // 8)
    raw = b"".join(value.to_bytes(width, "big") for value in values)
    return bytes([width]) + b"".join(raw[plane::width] for plane in range(width))


class _VarintReader:
    def __init__(self, data: memoryview, offset: int) -> None:
        self.data = data
        self.offset = offset

    def read(self) -> int:
        data, offset = self.data, self.offset
        result = shift = 0
        while True:
            if offset >= len(data):
                raise RecordError("block table is truncated")
            byte = data[offset]
            offset += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                self.offset = offset
                return result
            shift += 7
            if shift > 70:
                raise RecordError("block table has an invalid varint")

    def column(self, count: int) -> list[int]:
        width = self.take(1)[0]
        if not 1 <= width <= 16:
            raise RecordError("block column has an invalid width")
        raw = bytearray(width * count)
        for plane in range(width):
            raw[plane::width] = self.take(count)
        return [int.from_bytes(raw[n : n + width], "big") for n in range(0, width * count, width)]

    def take(self, length: int) -> bytes:
        end = self.offset + length
        if end > len(self.data):
            raise RecordError("block table is truncated")
        chunk = bytes(self.data[self.offset : end])
        self.offset = end
        return chunk


def block_crcs(crcs: Iterable[int]) -> int:
    """
    Return the digest a version 3 block without a checksum column keeps:
    the CRC-32 of its records' CRC-32s (4 bytes each, big-endian) in key
    order.  The compactor takes them from the headers written at ingest,
    so a body that changed since then fails the block when it is read.
    """
    digest = 0
    for crc in crcs:
        digest = zlib.crc32(crc.to_bytes(4, "big"), digest)
    return digest


def block_v3_sections(
    entries: list[tuple[bytes, RecordHeader, bytes]],
    record_checksums: bool = False,
    derive: Optional[ItemTimesDeriver] = None,
) -> list[bytes]:
    """
    Lay out records for packing, before compression (block version 3), as
    sections whose concatenation is the block; the last is the bodies.

    Every header field that repeats (vendor, kind, route, method, path,
    query, content type and encoding, headers, dictionary) goes into a
    table of distinct header shapes, stored once each.  Fields that vary go
    into columns, one value per record.  Identical headers then cost only a
    shape index, and zstd finds the regularity of each column::

        "RBK3" | flags (1) | count (4)
        | varint shape count | (varint length | shape JSON)...
        | 8 columns | checks | bodies...

    Columns, one value per record: arrival-time deltas (the first from
    0), sequence deltas (zigzag), shape indexes, body lengths, wire size
    minus size (zigzag), items, item_min_ns - received_ns and item_max_ns
    - item_min_ns (0 when unset, else 1 + zigzag).  Each column is its
    width in bytes (1 byte) and then its values' big-endian bytes as
    planes, most significant plane first.  With L{BLOCK_SCALED_TIMES} in
    flags (always set when writing) the three time columns are each preceded
    by a varint scale that divides their deltas and offsets.  Checks are
    the CRC-32 column (4 bytes each, when flags has
    L{BLOCK_RECORD_CHECKSUMS}) or the digest of L{block_crcs} (4 bytes).
    Varints are unsigned LEB128.

    @param entries: C{(key, header, decoded body)} in key order; each
        header's C{size} and C{crc32} must describe its body.
    @param record_checksums: keep each record's CRC-32 (4 bytes a record)
        rather than one digest of them for the whole block.
    @param derive: when given and it reproduces the item time range of
        every record that has items (and no record without items has
        one), the item time columns are left empty and the block is
        flagged L{BLOCK_DERIVED_ITEM_TIMES}.
    @return: the sections of the uncompressed block.
    @raise RecordError: a body does not match its header's size, or the
        records are not in key order.
    """
    shapes: dict[bytes, int] = {}
    table = bytearray()
    columns: list[list[int]] = [[] for _ in range(8)]
    times, sequences, shape_column, lengths, wire, items, item_min, item_max = columns
    min_offsets: list[Optional[int]] = []
    max_offsets: list[Optional[int]] = []
    previous_ns = previous_sequence = 0
    for key, header, body in entries:
        if header.size != len(body):
            raise RecordError("packed body does not match its header's size")
        time_ns, sequence = _KEY.unpack(key)
        fields = attrs.asdict(header)
        for name in _COLUMN_FIELDS:
            del fields[name]
        shape = json.dumps(fields, separators=(",", ":")).encode("utf-8")
        index = shapes.get(shape)
        if index is None:
            index = shapes[shape] = len(shapes)
            _put_varint(table, len(shape))
            table += shape
        if time_ns < previous_ns:
            raise RecordError("packed records are not in key order")
        times.append(time_ns - previous_ns)
        sequences.append(_zigzag(sequence - previous_sequence))
        previous_ns, previous_sequence = time_ns, sequence
        shape_column.append(index)
        lengths.append(len(body))
        wire.append(_zigzag(header.wire_size - header.size))
        items.append(0 if header.items is None else header.items + 1)
        min_offsets.append(None if header.item_min_ns is None else header.item_min_ns - time_ns)
        base = header.item_min_ns if header.item_min_ns is not None else time_ns
        max_offsets.append(None if header.item_max_ns is None else header.item_max_ns - base)
    derived = derive is not None and _derivable(entries, derive)
    if derived:
        min_offsets = max_offsets = [None] * len(entries)
    scales = bytearray()
    time_scale = _scale_of(times)
    times[:] = [delta // time_scale for delta in times]
    _put_varint(scales, time_scale)
    for offsets, column in ((min_offsets, item_min), (max_offsets, item_max)):
        scale = _scale_of(abs(offset) for offset in offsets if offset is not None)
        column.extend(0 if offset is None else 1 + _zigzag(offset // scale) for offset in offsets)
        _put_varint(scales, scale)
    if record_checksums:
        checks = struct.pack(f">{len(entries)}I", *(header.crc32 for _, header, _ in entries))
    else:
        checks = block_crcs(header.crc32 for _, header, _ in entries).to_bytes(4, "big")
    shape_count = bytearray()
    _put_varint(shape_count, len(shapes))
    flags = (BLOCK_RECORD_CHECKSUMS if record_checksums else 0) | BLOCK_SCALED_TIMES
    if derived:
        flags |= BLOCK_DERIVED_ITEM_TIMES
    return (
        [_BLOCK_V3_HEAD.pack(_BLOCK_MAGIC_V3, flags, len(entries)) + bytes(shape_count) + bytes(table) + bytes(scales)]
        + [_planes(column) for column in columns]
        + [checks, b"".join(body for _, _, body in entries)]
    )


def _derivable(entries: list[tuple[bytes, RecordHeader, bytes]], derive: ItemTimesDeriver) -> bool:
    for _, header, body in entries:
        stored = (header.item_min_ns, header.item_max_ns)
        if header.items is None:
            if stored != (None, None):
                return False
            continue
        fields = {"path": header.path, "content_type": header.content_type, "query": header.query,
                  "headers": header.headers}
        if derive(fields, body) != stored:
            return False
    return True


def encode_block_v3(entries: list[tuple[bytes, RecordHeader, bytes]], record_checksums: bool = False) -> bytes:
    """
    Return the uncompressed version 3 block of C{entries}: the
    concatenation of L{block_v3_sections}.
    """
    return b"".join(block_v3_sections(entries, record_checksums))


def _decode_block_v3(data: bytes) -> Iterator[tuple[bytes, bytes, bytes]]:
    if len(data) < _BLOCK_V3_HEAD.size:
        raise RecordError("block is truncated")
    _, flags, count = _BLOCK_V3_HEAD.unpack_from(data)
    if flags & ~_BLOCK_FLAGS:
        raise RecordError(f"block has unknown flags {flags:#04x}")
    view = memoryview(data)
    reader = _VarintReader(view, _BLOCK_V3_HEAD.size)
    shapes = []
    for _ in range(reader.read()):
        try:
            shapes.append(json.loads(reader.take(reader.read())))
        except ValueError as error:
            raise RecordError(f"block header shape is invalid: {error}") from None
    time_scale = min_scale = max_scale = 1
    if flags & BLOCK_SCALED_TIMES:
        time_scale, min_scale, max_scale = reader.read(), reader.read(), reader.read()
        if not (time_scale and min_scale and max_scale):
            raise RecordError("block has a zero time scale")
    times, sequences, shape_column, lengths, wire, items, item_min, item_max = (reader.column(count) for _ in range(8))
    record_checksums = bool(flags & BLOCK_RECORD_CHECKSUMS)
    derived = bool(flags & BLOCK_DERIVED_ITEM_TIMES)
    if record_checksums:
        checks = struct.unpack(f">{count}I", reader.take(4 * count))
    else:
        digest = int.from_bytes(reader.take(4), "big")
    offset = reader.offset
    if offset + sum(lengths) != len(data):
        raise RecordError("block lengths do not add up")
    bodies = []
    for length in lengths:
        bodies.append(bytes(view[offset : offset + length]))
        offset += length
    if not record_checksums and block_crcs(zlib.crc32(body) for body in bodies) != digest:
        raise RecordError("block bodies do not match the checksums taken at ingest")
    time_ns = sequence = 0
    for index in range(count):
        time_ns += times[index] * time_scale
        sequence += _unzigzag(sequences[index])
        if shape_column[index] >= len(shapes):
            raise RecordError("block refers to an unknown header shape")
        body = bodies[index]
        fields = dict(shapes[shape_column[index]])
        fields["received_ns"] = time_ns
        fields["size"] = len(body)
        if record_checksums:
            fields["crc32"] = checks[index]
        fields["wire_size"] = len(body) + _unzigzag(wire[index])
        if items[index]:
            fields["items"] = items[index] - 1
        if derived and items[index]:
            # parse_packed_header recomputes them when its caller requests them.
            fields[_DERIVED_MARK] = True
            item_min_ns = item_max_ns = None
        else:
            item_min_ns = _from_optional(item_min[index], time_ns, min_scale)
            item_max_ns = _from_optional(item_max[index], item_min_ns if item_min_ns is not None else time_ns, max_scale)
        if item_min_ns is not None:
            fields["item_min_ns"] = item_min_ns
        if item_max_ns is not None:
            fields["item_max_ns"] = item_max_ns
        yield (
            _KEY.pack(time_ns, sequence & 0xFFFFFFFF),
            json.dumps(fields, separators=(",", ":")).encode("utf-8"),
            body,
        )
