"""Encryption at rest: the object format and an encrypting artifact store.

Every object kiln writes to the artifact store (datasets, bundles, checkpoints,
prediction logs, base models) is AES-256-GCM ciphertext under a data key of
:mod:`kiln.store.keyring`: its project's for ``projects/<name>/...``, the platform's
for anything else (``base-models/...``). Object names and sizes stay visible;
contents do not.

Object format (version 1)::

    header   = "KILNENC" | version (1 byte) | segment size (u32) | data key id (u64)
    segment* = nonce (12 bytes) | ciphertext | tag (16 bytes)

The plaintext is cut into segments of 1 MiB (the last one shorter, possibly empty),
so files of any size stream through a constant ~2 MiB of memory. Each segment has its
own random nonce, and its associated data binds the header, the segment's index, a
"last segment" flag and the object's key: reordered, truncated, extended or moved
ciphertext (even to another object's name) fails its tag. The overhead is 20 bytes
plus 28 per MiB; ``size``/``total_size`` report stored (ciphertext) bytes. The key id
in the header names the data key row, so decryption never guesses.

Objects without the header (written before encryption existed) are refused unless
``KILN_ALLOW_PLAINTEXT_ARTIFACTS=1``; ``kiln keys encrypt-existing`` converts them.
"""

from __future__ import annotations

import os
import secrets
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kiln.errors import EncryptionError, NotFoundError
from kiln.settings import Settings
from kiln.store.artifacts import (
    ArtifactStore,
    _atomic_write,
    _check_key,
    get_dir,
    open_store,
    put_dir,
)
from kiln.store.db import Database
from kiln.store.keyring import (
    Keyring,
    MasterKey,
    Rotation,
    load_master_key,
    open_keyring,
    rotate_master_key,
)

__all__ = [
    "EncryptedStore",
    "Keyring",
    "MasterKey",
    "Rotation",
    "decrypt_stream",
    "encrypt_stream",
    "load_master_key",
    "open_artifacts",
    "open_keyring",
    "rotate_master_key",
]

MAGIC = b"KILNENC"
VERSION = 1
SEGMENT = 1 << 20  # plaintext bytes per segment
HEADER = struct.Struct(">7sBIQ")  # magic, version, segment size, data key id
NONCE = 12
TAG = 16


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


# --- the object format ----------------------------------------------------------------


def _segment_ad(header: bytes, index: int, last: bool, key: str) -> bytes:
    return header + struct.pack(">Q?", index, last) + key.encode()


def encrypt_stream(src: Readable, dst: Writable, aead: AESGCM, key_id: int, key: str) -> None:
    """Write the encrypted form of ``src`` (read to its end) for artifact ``key``."""
    header = HEADER.pack(MAGIC, VERSION, SEGMENT, key_id)
    dst.write(header)
    index = 0
    block = src.read(SEGMENT)
    while True:
        following = src.read(SEGMENT) if len(block) == SEGMENT else b""
        last = not following
        nonce = secrets.token_bytes(NONCE)
        dst.write(nonce)
        dst.write(aead.encrypt(nonce, block, _segment_ad(header, index, last, key)))
        if last:
            return
        block, index = following, index + 1


def _read_exact(src: Readable, n: int) -> bytes:
    out = src.read(n)
    while len(out) < n and (more := src.read(n - len(out))):
        out += more
    return out


def decrypt_stream(src: Readable, dst: Writable, cipher: Callable[[int], AESGCM], key: str) -> None:
    """Write the plaintext of an encrypted ``src`` (header already known to be present)."""
    header = _read_exact(src, HEADER.size)
    if len(header) < HEADER.size:
        raise _tampered(key)
    magic, version, segment, key_id = HEADER.unpack(header)
    if magic != MAGIC or version != VERSION or not 0 < segment <= 64 * SEGMENT:
        raise EncryptionError(f"artifact {key!r} has an unknown encryption header", field="key")
    aead = cipher(key_id)
    record = NONCE + segment + TAG
    index = 0
    block = _read_exact(src, record)
    while True:
        following = _read_exact(src, record) if len(block) == record else b""
        last = not following
        if len(block) < NONCE + TAG:
            raise _tampered(key)
        try:
            plain = aead.decrypt(
                block[:NONCE], block[NONCE:], _segment_ad(header, index, last, key)
            )
        except InvalidTag:
            raise _tampered(key) from None
        dst.write(plain)
        if last:
            return
        block, index = following, index + 1


def _tampered(key: str) -> EncryptionError:
    return EncryptionError(
        f"artifact {key!r} failed its integrity check (AES-GCM tag): it was altered, "
        "truncated or moved",
        field="key",
    )


def is_encrypted(head: bytes) -> bool:
    return head[: len(MAGIC)] == MAGIC


# --- the store ----------------------------------------------------------------------------


class BytesReader:
    """A minimal read-only stream over ``bytes`` (no copy, unlike BytesIO(data).read)."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n < 0 else min(len(self._view), self._pos + n)
        out = bytes(self._view[self._pos : end])
        self._pos = end
        return out


class _Sink:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(data)
        return len(data)


class EncryptedStore:
    """An :class:`~kiln.store.artifacts.ArtifactStore` that encrypts everything it stores.

    Same contract as the store it wraps (``inner``), which holds only ciphertext. Reads
    raise :class:`EncryptionError` for an altered object, and for a plaintext one unless
    ``allow_plaintext``. Files stream through temporary ciphertext files, never whole in
    memory; ``size`` and ``total_size`` are stored (ciphertext) bytes.
    """

    def __init__(
        self, inner: ArtifactStore, keyring: Keyring, *, allow_plaintext: bool = False
    ) -> None:
        self.inner = inner
        self.keyring = keyring
        self.allow_plaintext = allow_plaintext
        self.url = inner.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _encrypt(self, key: str, src: Readable, dst: Writable) -> None:
        key_id = self.keyring.key_for(key)
        encrypt_stream(src, dst, self.keyring.cipher(key_id), key_id, key)

    def _decrypt(self, key: str, src: Readable, dst: Writable) -> None:
        head = _read_exact(src, len(MAGIC))
        if is_encrypted(head):
            decrypt_stream(_Prefixed(head, src), dst, self.keyring.cipher, key)
            return
        if not self.allow_plaintext:
            raise EncryptionError(
                f"artifact {key!r} is not encrypted: it predates encryption at rest or was "
                "put there by hand (run `kiln keys encrypt-existing`, or set "
                "KILN_ALLOW_PLAINTEXT_ARTIFACTS=1 to read such objects as they are)",
                field="key",
            )
        dst.write(head)
        while block := src.read(SEGMENT):
            dst.write(block)

    @contextmanager
    def _scratch(self) -> Iterator[Path]:
        fd, name = tempfile.mkstemp(prefix="kiln-crypt-")
        os.close(fd)
        try:
            yield Path(name)
        finally:
            Path(name).unlink(missing_ok=True)

    # -- the contract ---------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes) -> None:
        _check_key(key)
        sink = _Sink()
        self._encrypt(key, BytesReader(data), sink)
        self.inner.put_bytes(key, b"".join(sink.parts))

    def get_bytes(self, key: str) -> bytes:
        sink = _Sink()
        self._decrypt(key, BytesReader(self.inner.get_bytes(key)), sink)
        return b"".join(sink.parts)

    def put_file(self, key: str, path: str | Path) -> None:
        _check_key(key)
        if not Path(path).is_file():
            raise NotFoundError(f"no file {str(path)!r} to store", field="path")
        with self._scratch() as tmp:
            with open(path, "rb") as src, tmp.open("wb") as dst:
                self._encrypt(key, src, dst)
            self.inner.put_file(key, tmp)

    def get_file(self, key: str, path: str | Path) -> None:
        with self._scratch() as tmp:
            self.inner.get_file(key, tmp)
            with tmp.open("rb") as src:
                _atomic_write(str(path), lambda dst: self._decrypt(key, src, dst))

    def put_dir(self, prefix: str, directory: str | Path) -> list[str]:
        return put_dir(self, prefix, directory)  # file by file, each encrypted

    def get_dir(self, prefix: str, directory: str | Path) -> None:
        get_dir(self, prefix, directory)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def total_size(self, prefix: str) -> int:
        return self.inner.total_size(prefix)

    def list(self, prefix: str) -> list[str]:
        return self.inner.list(prefix)

    def delete(self, key_or_prefix: str) -> None:
        self.inner.delete(key_or_prefix)

    # -- maintenance ----------------------------------------------------------------
    def encrypt_existing(self) -> int:
        """Encrypt, in place, every object still stored as plaintext; how many were."""
        done = 0
        for key in self.inner.list(""):
            with self._scratch() as tmp:
                self.inner.get_file(key, tmp)
                with tmp.open("rb") as fh:
                    if is_encrypted(fh.read(len(MAGIC))):
                        continue
                self.put_file(key, tmp)
                done += 1
        return done


class _Prefixed:
    """``src`` with ``head`` (already read from it) put back in front."""

    def __init__(self, head: bytes, src: Readable) -> None:
        self._head = head
        self._src = src

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._src.read(n)
        if n < 0:
            out, self._head = self._head + self._src.read(), b""
            return out
        out, self._head = self._head[:n], self._head[n:]
        return out if len(out) == n else out + self._src.read(n - len(out))


def open_artifacts(settings: Settings, db: Database) -> EncryptedStore:
    """The platform's artifact store: ``KILN_ARTIFACTS`` (with S3 server-side encryption
    if ``KILN_S3_SSE`` says so), encrypted with the data keys of ``db``.

    Raises :class:`EncryptionError` at once when the master key is missing or wrong.
    """
    inner = open_store(
        settings.resolved_artifacts,
        endpoint_url=settings.s3_endpoint_url,
        sse=settings.s3_sse,
        sse_kms_key_id=settings.s3_sse_kms_key_id,
    )
    keyring = open_keyring(db, settings)
    return EncryptedStore(inner, keyring, allow_plaintext=settings.allow_plaintext_artifacts)
