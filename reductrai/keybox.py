"""
Encryption of the credentials a spooled request needs for its replay.

A spooled request keeps its exact request-target and header block, API
keys included, so that it can be sent again later.  Those bytes are never
written in the clear: L{KeyBox.seal} encrypts them with AES-256-GCM under
a key that lives outside LMDB, and binds each sealed blob to its spool
entry (the entry id is the associated data), so that a blob copied onto
another entry does not open.

The key comes from a configured secret (C{spool.key}, usually given as
C{spool.key_file} or C{REDUCTRAI_SPOOL_KEY_FILE}) or, when none is
configured, from the file C{spool.key} in the data directory, created with
mode 0600 on first use.

Sealed form::

    version (1 byte, 1) | key id (4 bytes) | nonce (12 bytes) | ciphertext and tag
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
import time
from pathlib import Path
from typing import Iterable, Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from reductrai.secrets import Secret

KEY_FILE_NAME = "spool.key"
KEY_SIZE = 32
NONCE_SIZE = 12
_VERSION = 1
_KEY_ID_SIZE = 4
_HEADER_SIZE = 1 + _KEY_ID_SIZE + NONCE_SIZE


class KeyBoxError(Exception):
    """
    A key is unusable, or a sealed blob cannot be opened (wrong key,
    tampered bytes or another entry's blob).  The message never contains
    key material or plaintext.
    """


def parse_key(text: str | bytes, source: str) -> bytes:
    """
    Decode a 256-bit key written as 64 hexadecimal digits or as base64
    (standard or URL-safe alphabet).

    @param source: where the key came from, for the error message.
    @raise KeyBoxError: the text is not such a key.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise KeyBoxError(f"{source}: the key is not ASCII text") from None
    text = text.strip()
    if len(text) == 2 * KEY_SIZE:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        key = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_SIZE:
        raise KeyBoxError(
            f"{source}: expected a {KEY_SIZE * 8}-bit key as {2 * KEY_SIZE} hexadecimal digits or base64"
        )
    return key


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"reductrai spool key id\x00" + key).digest()[:_KEY_ID_SIZE]


class KeyBox:
    """
    Seal and open credential blobs with AES-256-GCM.

    @ivar source: where the current key came from, safe to log.
    """

    def __init__(self, key: bytes, previous: Iterable[bytes] = (), source: str = "memory") -> None:
        """
        @param key: the 32-byte key new blobs are sealed with.
        @param previous: older keys that blobs may still be sealed with;
            they open blobs but never seal.
        """
        if len(key) != KEY_SIZE:
            raise KeyBoxError(f"{source}: a spool key has {KEY_SIZE} bytes, got {len(key)}")
        self.source = source
        self._key_id = _key_id(key)
        self._sealer = AESGCM(key)
        self._openers = {self._key_id: self._sealer}
        for old in previous:
            self._openers.setdefault(_key_id(old), AESGCM(old))

    @classmethod
    def generate(cls) -> "KeyBox":
        """
        Return a box with a fresh random key (tests, throwaway spools).
        """
        return cls(AESGCM.generate_key(bit_length=KEY_SIZE * 8), source="generated")

    @classmethod
    def load(cls, data_dir: str, configured: Optional[Secret] = None) -> "KeyBox":
        """
        Return the box of a data directory: the configured key if any,
        otherwise the key in C{<data_dir>/spool.key}, created with mode
        0600 when missing.

        @raise KeyBoxError: the configured key or the key file is invalid,
            or the key file can be read by other users.
        """
        if configured is not None:
            return cls(parse_key(configured.reveal(), configured.source), source=configured.source)
        path = Path(data_dir) / KEY_FILE_NAME
        return cls(load_or_create_key_file(path), source=str(path))

    def seal(self, plaintext: bytes, associated: bytes) -> bytes:
        """
        Encrypt C{plaintext}, bound to C{associated} (the entry id).
        """
        nonce = os.urandom(NONCE_SIZE)
        ciphertext = self._sealer.encrypt(nonce, plaintext, associated)
        return bytes((_VERSION,)) + self._key_id + nonce + ciphertext

    def open(self, blob: bytes, associated: bytes) -> bytes:
        """
        Decrypt a blob made by L{seal} with the same C{associated} bytes.

        @raise KeyBoxError: unknown format, unknown key, or the blob or its
            associated data were altered.
        """
        if len(blob) < _HEADER_SIZE + 16 or blob[0] != _VERSION:
            raise KeyBoxError("sealed credentials have an unknown format")
        opener = self._openers.get(bytes(blob[1 : 1 + _KEY_ID_SIZE]))
        if opener is None:
            raise KeyBoxError("sealed credentials use a key this box does not hold")
        nonce = bytes(blob[1 + _KEY_ID_SIZE : _HEADER_SIZE])
        try:
            return opener.decrypt(nonce, bytes(blob[_HEADER_SIZE:]), associated)
        except InvalidTag:
            raise KeyBoxError("sealed credentials failed authentication (altered, or another entry's)") from None

    def __repr__(self) -> str:
        return f"KeyBox(source={self.source!r})"


def load_or_create_key_file(path: Path) -> bytes:
    """
    Read a key file, or create it with a fresh random key and mode 0600.

    Creation uses C{O_CREAT | O_EXCL}, so two processes starting together
    cannot both write a key: the loser reads the winner's.

    @raise KeyBoxError: the file cannot be read or written, is not a key,
        or grants any access to group or others.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as error:
        raise KeyBoxError(f"cannot create spool key file {path}: {error.strerror}") from None
    else:
        text = base64.b64encode(AESGCM.generate_key(bit_length=KEY_SIZE * 8)) + b"\n"
        try:
            os.write(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)
    for _ in range(100):
        try:
            info = path.stat()
            if stat.S_IMODE(info.st_mode) & 0o077:
                raise KeyBoxError(
                    f"spool key file {path} is readable by other users (mode "
                    f"{stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}"
                )
            data = path.read_bytes()
        except OSError as error:
            raise KeyBoxError(f"cannot read spool key file {path}: {error.strerror}") from None
        if data:
            return parse_key(data, str(path))
        # Another process created the file and has not written it yet.
        time.sleep(0.01)
    raise KeyBoxError(f"spool key file {path} is empty")
