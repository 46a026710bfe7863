"""
Hot backups of the store: a consistent, compacted copy taken while the
daemon runs, optionally encrypted.

The copy is LMDB's own (C{mdb_env_copy2} with compaction) inside one read
transaction, so it is a snapshot of one committed state and never blocks
the writer.  An encrypted backup is::

    "RDTBAK1\\n" | salt (16) | base nonce (12) | chunks...

each chunk AES-256-GCM over at most 1 MiB of the copy with the nonce
C{base nonce XOR chunk number} and the associated data C{chunk number (8) |
last flag (1)}, so chunks cannot be reordered, dropped or truncated
unnoticed.  The key is scrypt(passphrase, salt, n=2**15, r=8, p=1).
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from typing import Optional

import lmdb

MAGIC = b"RDTBAK1\n"
CHUNK = 1 << 20
_TAG = 16
_AAD = struct.Struct(">QB")


class BackupError(Exception):
    """
    A backup cannot be read: wrong passphrase, corrupt or truncated.
    """


def derive_key(passphrase: bytes, salt: bytes) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=32, n=2**15, r=8, p=1).derive(passphrase)


def _nonce(base: bytes, index: int) -> bytes:
    return (int.from_bytes(base, "big") ^ index).to_bytes(12, "big")


def backup(env: lmdb.Environment, dest: str, passphrase: Optional[bytes] = None) -> int:
    """
    Write a compacted snapshot of C{env} to the file C{dest}.

    @return: the bytes written.
    """
    scratch = tempfile.mkdtemp(prefix=".backup-", dir=os.path.dirname(os.path.abspath(dest)) or ".")
    try:
        with env.begin() as txn:
            env.copy(scratch, compact=True, txn=txn)
        source = os.path.join(scratch, "data.mdb")
        if passphrase is None:
            os.replace(source, dest)
            return os.path.getsize(dest)
        _encrypt_file(source, dest, passphrase)
        return os.path.getsize(dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _encrypt_file(source: str, dest: str, passphrase: bytes) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    salt, base = os.urandom(16), os.urandom(12)
    cipher = AESGCM(derive_key(passphrase, salt))
    size = os.path.getsize(source)
    chunks = max(1, -(-size // CHUNK))
    with open(source, "rb") as reader, open(dest + ".part", "wb") as writer:
        writer.write(MAGIC + salt + base)
        for index in range(chunks):
            plain = reader.read(CHUNK)
            writer.write(cipher.encrypt(_nonce(base, index), plain, _AAD.pack(index, index == chunks - 1)))
    os.replace(dest + ".part", dest)


def _decrypt_file(source: str, dest: str, passphrase: bytes) -> None:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    with open(source, "rb") as reader, open(dest, "wb") as writer:
        head = reader.read(len(MAGIC) + 28)
        if len(head) != len(MAGIC) + 28 or not head.startswith(MAGIC):
            raise BackupError("not an encrypted reductrai backup")
        salt, base = head[len(MAGIC) : len(MAGIC) + 16], head[len(MAGIC) + 16 :]
        cipher = AESGCM(derive_key(passphrase, salt))
        index = 0
        chunk = reader.read(CHUNK + _TAG)
        while True:
            following = reader.read(CHUNK + _TAG)
            last = not following
            try:
                writer.write(cipher.decrypt(_nonce(base, index), chunk, _AAD.pack(index, last)))
            except InvalidTag:
                raise BackupError("the backup is corrupt, truncated or the passphrase is wrong") from None
            if last:
                return
            chunk = following
            index += 1


def is_encrypted(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def restore(src: str, target_dir: str, passphrase: Optional[bytes] = None) -> int:
    """
    Install the backup C{src} as the environment in C{target_dir}
    (replacing its data file; the daemon must not be running).

    @return: the size of the restored data file.
    @raise BackupError: the backup is encrypted and no or a wrong
        passphrase was given, or it is not a valid LMDB file.
    """
    os.makedirs(target_dir, mode=0o700, exist_ok=True)
    staged = os.path.join(target_dir, "data.mdb.restore")
    if is_encrypted(src):
        if passphrase is None:
            raise BackupError("the backup is encrypted: give the passphrase file")
        _decrypt_file(src, staged, passphrase)
    else:
        shutil.copyfile(src, staged)
    os.chmod(staged, 0o600)
    check_dir = tempfile.mkdtemp(prefix=".restore-check-", dir=target_dir)
    try:
        os.link(staged, os.path.join(check_dir, "data.mdb"))
        try:
            env = lmdb.open(check_dir, readonly=True, lock=False, max_dbs=32, subdir=True)
            env.stat()
            env.close()
        except lmdb.Error as error:
            os.unlink(staged)
            raise BackupError(f"the backup is not a valid store: {error}") from None
    finally:
        shutil.rmtree(check_dir, ignore_errors=True)
    os.replace(staged, os.path.join(target_dir, "data.mdb"))
    lock = os.path.join(target_dir, "lock.mdb")
    if os.path.exists(lock):
        os.unlink(lock)
    return os.path.getsize(os.path.join(target_dir, "data.mdb"))
