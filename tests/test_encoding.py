"""
Tests for L{reductrai.encoding}: round trips against independent
compressors, the captured corpus, decompression bombs, corrupt input, and
property tests over arbitrary bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import random
import struct
import tracemalloc
import zlib
from typing import Callable

import brotli
import cramjam
import lz4.frame
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reductrai.encoding import (
    SUPPORTED_ENCODINGS,
    CorruptBody,
    DecodedTooLarge,
    EncodingError,
    UnsupportedEncoding,
    decode_body,
    parse_content_encoding,
)
from tests import corpus

MiB = 1 << 20


def _sample(size: int, seed: int = 7) -> bytes:
    """
    Return C{size} bytes of JSON-like, compressible but not trivial text.
    """
    rng = random.Random(seed)
    words = [b"metric", b"host:fake-host-01", b"value", b"1796413826.75", b"gauge", b"tags"]
    parts: list[bytes] = []
    total = 0
    while total < size:
        word = rng.choice(words) + str(rng.randrange(10_000)).encode() + b","
        parts.append(word)
        total += len(word)
    return b"".join(parts)[:size]


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


# Independent encoders, one per token, from the field's own libraries.
ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda data: gzip.compress(data),
    "x-gzip": lambda data: gzip.compress(data, compresslevel=1),
    "deflate": zlib.compress,
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
    "zstd1": lambda data: zstandard.ZstdCompressor(level=1, write_checksum=True).compress(data),
    "snappy": lambda data: bytes(cramjam.snappy.compress_raw(data)),
    "x-snappy-framed": lambda data: bytes(cramjam.snappy.compress(data)),
    "lz4": lambda data: lz4.frame.compress(data, content_checksum=True),
    "br": brotli.compress,
}


def test_supported_encodings_match_encoders() -> None:
    assert SUPPORTED_ENCODINGS == frozenset(ENCODERS) | {"identity"}


# --- header parsing -------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, []),
        ("", []),
        ("identity", []),
        ("GZIP", ["gzip"]),
        (" gzip , zstd ", ["gzip", "zstd"]),
        ("gzip,,identity, Br", ["gzip", "br"]),
        ("x-unknown", ["x-unknown"]),
    ],
)
def test_parse_content_encoding(header: str | None, expected: list[str]) -> None:
    assert parse_content_encoding(header) == expected


# --- round trips ---------------------------------------------------------------


@pytest.mark.parametrize("token", sorted(ENCODERS))
@pytest.mark.parametrize("size", [1, 1000, 3 * MiB + 17])
def test_round_trip(token: str, size: int) -> None:
    data = _sample(size, seed=size)
    encoded = ENCODERS[token](data)
    assert decode_body(encoded, token, 4 * MiB) == data
    # Exactly at the cap is allowed; one byte under is not.
    assert decode_body(encoded, token, size) == data
    with pytest.raises(DecodedTooLarge) as raised:
        decode_body(encoded, token, size - 1)
    assert raised.value.limit == size - 1


@pytest.mark.parametrize("token", sorted(ENCODERS))
def test_empty_payload_round_trip(token: str) -> None:
    assert decode_body(ENCODERS[token](b""), token, 0) == b""


def test_identity_returns_body_uncopied() -> None:
    body = _sample(5000)
    assert decode_body(body, None, 5000) is body
    assert decode_body(body, "identity", 5000) is body
    with pytest.raises(DecodedTooLarge):
        decode_body(body, None, 4999)


def test_raw_deflate() -> None:
    data = _sample(200_000)
    assert decode_body(_raw_deflate(data), "deflate", MiB) == data


def test_gzip_concatenated_members() -> None:
    first, second, third = _sample(1000, 1), _sample(70_000, 2), b""
    body = gzip.compress(first) + gzip.compress(second) + gzip.compress(third)
    assert decode_body(body, "gzip", MiB) == first + second + third
    with pytest.raises(DecodedTooLarge):
        decode_body(body, "gzip", len(first) + len(second) - 1)


def test_zstd_concatenated_and_skippable_frames() -> None:
    first, second = _sample(1000, 1), _sample(300_000, 2)
    streamed = zstandard.ZstdCompressor(write_content_size=False)
    skippable = struct.pack("<II", 0x184D2A53, 5) + b"hello"
    body = zstandard.ZstdCompressor().compress(first) + skippable + streamed.compress(second)
    assert decode_body(body, "zstd", MiB) == first + second
    with pytest.raises(DecodedTooLarge):
        decode_body(body, "zstd", len(first) + len(second) - 1)


def test_zstd_frame_without_size() -> None:
    data = _sample(2 * MiB)
    compressor = zstandard.ZstdCompressor(level=19, write_checksum=True)
    chunker = compressor.chunker(chunk_size=32768)
    body = b"".join([*chunker.compress(data), *chunker.finish()])
    assert zstandard.get_frame_parameters(body).content_size == zstandard.CONTENTSIZE_UNKNOWN
    assert decode_body(body, "zstd", 2 * MiB) == data


def test_lz4_concatenated_frames_linked_blocks() -> None:
    first, second = _sample(100_000, 1), _sample(300_000, 2)
    body = lz4.frame.compress(first, block_linked=True) + lz4.frame.compress(
        second, block_linked=False, block_checksum=True
    )
    assert decode_body(body, "lz4", MiB) == first + second


def test_snappy_framed_concatenated_streams() -> None:
    first, second = _sample(100_000, 1), _sample(1_500_000, 2)
    body = ENCODERS["x-snappy-framed"](first) + ENCODERS["x-snappy-framed"](second)
    assert decode_body(body, "x-snappy-framed", 2 * MiB) == first + second


@pytest.mark.parametrize(
    "chain",
    [["gzip", "zstd"], ["deflate", "br"], ["snappy", "gzip"], ["zstd1", "lz4", "x-snappy-framed"]],
)
def test_chain_decoded_right_to_left(chain: list[str]) -> None:
    data = _sample(50_000)
    body = data
    for token in chain:  # applied left to right, as the header lists them
        body = ENCODERS[token](body)
    assert decode_body(body, ", ".join(chain), MiB) == data


def test_chain_checks_tokens_first() -> None:
    with pytest.raises(UnsupportedEncoding) as raised:
        decode_body(b"not gzip at all", "compress, gzip", MiB)
    assert raised.value.encoding == "compress"
    assert "compress" in raised.value.reason


def test_unsupported_encoding() -> None:
    with pytest.raises(UnsupportedEncoding) as raised:
        decode_body(b"abc", "X-Custom", MiB)
    assert raised.value.encoding == "x-custom"
    assert isinstance(raised.value, EncodingError)


# --- corpus ---------------------------------------------------------------------


CORPUS = [request for request in corpus.load_all() if request.meta.get("decoded_length") is not None]


@pytest.mark.parametrize("request_", CORPUS, ids=[f"{r.folder}/{r.name}" for r in CORPUS])
def test_corpus_decoded_length(request_: corpus.CapturedRequest) -> None:
    expected = request_.meta["decoded_length"]
    header = request_.header("Content-Encoding")
    assert header == request_.meta["content_encoding"]
    assert hashlib.sha256(request_.body).hexdigest() == request_.meta["body_sha256"]
    decoded = decode_body(request_.body, header, expected)
    assert len(decoded) == expected
    if expected:
        with pytest.raises(DecodedTooLarge):
            decode_body(request_.body, header, expected - 1)


def test_corpus_has_every_captured_encoding() -> None:
    encodings = {parse_content_encoding(r.meta["content_encoding"])[0] for r in CORPUS if r.meta["content_encoding"]}
    assert {"gzip", "deflate", "zstd1", "snappy"} <= encodings


# --- bombs ----------------------------------------------------------------------


def _peak_while(function: Callable[[], object]) -> int:
    """
    Run C{function} (which must raise L{DecodedTooLarge}) and return the peak
    of traced Python allocations during the call.
    """
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(DecodedTooLarge):
            function()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def _gzip_zeros(size: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(MiB)
    parts = [compressor.compress(block) for _ in range(size // MiB)]
    parts.append(compressor.flush())
    return b"".join(parts)


def test_gzip_bomb_200_mb_of_zeros() -> None:
    bomb = _gzip_zeros(200 * MiB)
    assert len(bomb) < MiB
    peak = _peak_while(lambda: decode_body(bomb, "gzip", MiB))
    assert peak < 4 * MiB


def test_zstd_frame_declaring_one_terabyte() -> None:
    # Frame header: magic, descriptor 0xE0 (8-byte content size, single
    # segment so the window is the content size), then 1 TiB, then one RLE
    # block of 128 KiB of zeros that never ends the frame.
    header = struct.pack("<I", 0xFD2FB528) + bytes([0xE0]) + struct.pack("<Q", 1 << 40)
    rle_block = ((128 * 1024) << 3 | 1 << 1).to_bytes(3, "little") + b"\x00"
    bomb = header + rle_block * 100
    assert zstandard.get_frame_parameters(bomb).content_size == 1 << 40
    peak = _peak_while(lambda: decode_body(bomb, "zstd1", MiB))
    assert peak < 4 * MiB


def test_zstd_bomb_without_declared_size() -> None:
    # Frame with no content size and an 8 MiB window, then RLE blocks of
    # 128 KiB each: 4 bytes of input per 128 KiB of output.
    window_descriptor = (23 - 10) << 3
    header = struct.pack("<I", 0xFD2FB528) + bytes([0x00, window_descriptor])
    rle_block = ((128 * 1024) << 3 | 1 << 1).to_bytes(3, "little") + b"\x00"
    bomb = header + rle_block * 1600  # 200 MiB of zeros
    peak = _peak_while(lambda: decode_body(bomb, "zstd", MiB))
    assert peak < 4 * MiB


def test_zstd_window_over_limit() -> None:
    # Window log 31 (2 GiB), no content size.
    header = struct.pack("<I", 0xFD2FB528) + bytes([0x00, (31 - 10) << 3])
    with pytest.raises(DecodedTooLarge) as raised:
        decode_body(header + b"\x01\x00\x00", "zstd", MiB)
    assert "window" in raised.value.reason


def test_snappy_block_declaring_four_gigabytes() -> None:
    preamble = bytes([0xFF, 0xFF, 0xFF, 0xFF, 0x0F])  # 2**32 - 1
    bomb = preamble + b"\x00" * 64
    peak = _peak_while(lambda: decode_body(bomb, "snappy", MiB))
    assert peak < 4 * MiB


def test_snappy_framed_bomb() -> None:
    bomb = ENCODERS["x-snappy-framed"](bytes(20 * MiB))
    peak = _peak_while(lambda: decode_body(bomb, "x-snappy-framed", MiB))
    assert peak < 4 * MiB


def test_lz4_bomb() -> None:
    bomb = lz4.frame.compress(bytes(200 * MiB), store_size=False)
    peak = _peak_while(lambda: decode_body(bomb, "lz4", MiB))
    assert peak < 4 * MiB


def test_brotli_bomb() -> None:
    bomb = brotli.compress(bytes(200 * MiB), quality=5)
    peak = _peak_while(lambda: decode_body(bomb, "br", MiB))
    assert peak < 4 * MiB


def test_bomb_inside_chain() -> None:
    bomb = zstandard.ZstdCompressor().compress(_gzip_zeros(50 * MiB))
    peak = _peak_while(lambda: decode_body(bomb, "gzip, zstd", MiB))
    assert peak < 4 * MiB


# --- corrupt input -------------------------------------------------------------


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda body: body[: len(body) // 2],
    "last byte missing": lambda body: body[:-1],
    "trailing garbage": lambda body: body + b"garbage!",
    "wrong magic": lambda body: b"\x00\x01\x02\x03" + body[4:],
    "empty": lambda body: b"",
}


@pytest.mark.parametrize("token", sorted(ENCODERS))
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_input(token: str, corruption: str) -> None:
    if token in ("snappy", "br") and corruption == "wrong magic":
        pytest.skip("the snappy block and brotli formats have no magic number")
    if token == "x-snappy-framed" and corruption == "empty":
        pytest.skip("an empty framed-snappy body is the encoding of an empty payload")
    body = CORRUPTIONS[corruption](ENCODERS[token](_sample(100_000)))
    with pytest.raises(CorruptBody) as raised:
        decode_body(body, token, MiB)
    assert token in raised.value.reason


@pytest.mark.parametrize("token", ["gzip", "deflate", "zstd", "lz4", "x-snappy-framed"])
def test_flipped_byte_fails_checksum(token: str) -> None:
    body = bytearray(ENCODERS[token](_sample(10_000)))
    body[-2] ^= 0x55
    with pytest.raises(CorruptBody):
        decode_body(bytes(body), token, MiB)


def test_snappy_block_length_mismatch() -> None:
    data = _sample(1000)
    body = bytearray(ENCODERS["snappy"](data))
    body[0] -= 1  # the preamble now declares one byte less than encoded
    with pytest.raises(CorruptBody):
        decode_body(bytes(body), "snappy", MiB)


def test_snappy_framed_reserved_chunk() -> None:
    body = b"\xff\x06\x00\x00sNaPpY" + b"\x02\x01\x00\x00x"
    with pytest.raises(CorruptBody) as raised:
        decode_body(body, "x-snappy-framed", MiB)
    assert "reserved" in raised.value.reason


def test_negative_cap_rejected() -> None:
    with pytest.raises(ValueError):
        decode_body(b"", None, -1)


# --- properties -----------------------------------------------------------------
#
# pytest-twisted wraps each hypothesis test function in place. That breaks when
# parametrized items share one @given function, so each token gets its own.

PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow],
)


def _check_outcome(body: bytes, token: str, cap: int) -> None:
    """
    Assert that decoding either returns at most C{cap} bytes or raises an
    L{EncodingError} with a reason; any other exception escapes and fails.
    """
    try:
        decoded = decode_body(body, token, cap)
    except EncodingError as error:
        assert error.reason
    else:
        assert isinstance(decoded, bytes)
        assert len(decoded) <= cap


def _arbitrary_bytes_test(token: str) -> Callable[..., None]:
    @PROPERTY_SETTINGS
    @given(body=st.binary(max_size=4096), cap=st.integers(min_value=0, max_value=MiB))
    def test(body: bytes, cap: int) -> None:
        _check_outcome(body, token, cap)

    test.__doc__ = f"Arbitrary bytes declared as {token} never raise anything but EncodingError."
    return test


def _damaged_stream_test(token: str) -> Callable[..., None]:
    @PROPERTY_SETTINGS
    @given(
        data=st.binary(max_size=20_000),
        cap=st.integers(min_value=0, max_value=40_000),
        position=st.integers(min_value=0),
        flip=st.integers(min_value=1, max_value=255),
    )
    def test(data: bytes, cap: int, position: int, flip: int) -> None:
        body = bytearray(ENCODERS[token](data))
        if body:
            body[position % len(body)] ^= flip
        _check_outcome(bytes(body), token, cap)

    test.__doc__ = f"A valid {token} stream with one damaged byte never escapes the contract."
    return test


def _valid_stream_test(token: str) -> Callable[..., None]:
    @PROPERTY_SETTINGS
    @given(data=st.binary(max_size=20_000), cap=st.integers(min_value=0, max_value=40_000))
    def test(data: bytes, cap: int) -> None:
        body = ENCODERS[token](data)
        if len(data) <= cap:
            assert decode_body(body, token, cap) == data
        else:
            with pytest.raises(DecodedTooLarge):
                decode_body(body, token, cap)

    test.__doc__ = f"A valid {token} stream decodes exactly, or is too large for the cap."
    return test


for _token in sorted(SUPPORTED_ENCODINGS):
    _name = _token.replace("-", "_")
    globals()[f"test_arbitrary_bytes_property_{_name}"] = _arbitrary_bytes_test(_token)
    if _token in ENCODERS:
        globals()[f"test_damaged_stream_property_{_name}"] = _damaged_stream_test(_token)
        globals()[f"test_valid_stream_property_{_name}"] = _valid_stream_test(_token)
