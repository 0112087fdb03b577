"""Authenticated sealing of repository objects (the only place ciphertext is made).

Sealed layout: ``suite(1) | header | body | tag(16)``.
- suite 0 (no encryption): header empty, body = plaintext, tag = BLAKE3(aad|body)[:16] —
  detects corruption, not forgery (there is no secret).
- suite 1 (AES-256-GCM): header = session id (16) | counter (8). Each writer process
  picks a random session id and derives its own key HKDF(master, session id), and the
  nonce is the counter: a (key, nonce) pair can never repeat, also across concurrent
  writers, without coordinating them. AAD binds the object to its name (id).
- suite 2 (no encryption, no tag): body = plaintext. Only chunks of format version 2
  repositories without encryption, whose plaintext the reader checks against the
  chunk id anyway (repository/objects.py); never accepted anywhere else.
"""

from __future__ import annotations

import itertools
import os
import threading
from abc import ABC, abstractmethod

import blake3
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher as _StreamCipher
from cryptography.hazmat.primitives.ciphers import algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import IntegrityError

SUITE_NONE = 0
SUITE_AES256GCM = 1
SUITE_NONE_ID_CHECKED = 2
TAG_LEN = 16

Buffer = bytes | bytearray | memoryview


class Cipher(ABC):
    suite: int

    @abstractmethod
    def seal(self, aad: bytes, plaintext: bytes | memoryview) -> bytes | bytearray: ...

    @abstractmethod
    def open(self, aad: bytes, sealed: bytes | memoryview, what: str) -> bytes | bytearray:
        """Return the plaintext or raise IntegrityError naming ``what``."""

    def seal_parts(self, aad: bytes, head: bytes, body: Buffer) -> list[Buffer]:
        """``seal(aad, head + body)`` as buffers to be written one after another."""
        return [self.seal(aad, head + body)]


class PlainCipher(Cipher):
    suite = SUITE_NONE

    def seal(self, aad: bytes, plaintext: bytes | memoryview) -> bytearray:
        h = blake3.blake3(aad)
        h.update(plaintext)
        out = bytearray(1 + len(plaintext) + TAG_LEN)
        mv = memoryview(out)
        mv[1 : 1 + len(plaintext)] = plaintext
        mv[1 + len(plaintext) :] = h.digest(TAG_LEN)
        return out

    def seal_parts(self, aad: bytes, head: bytes, body: Buffer) -> list[Buffer]:
        # no copy at all: the body (often the buffer the data was read into) is
        # written as it is, between the suite+head bytes and the tag
        h = blake3.blake3(aad)
        h.update(head)
        h.update(body)
        return [bytes([SUITE_NONE]) + head, body, h.digest(TAG_LEN)]

    def open(self, aad: bytes, sealed: bytes | memoryview, what: str) -> bytes:
        mv = memoryview(sealed)
        if len(mv) < 1 + TAG_LEN or mv[0] != SUITE_NONE:
            raise IntegrityError(f"{what}: damaged object header")
        body = mv[1:-TAG_LEN]
        h = blake3.blake3(aad)
        h.update(body)
        if h.digest(TAG_LEN) != mv[-TAG_LEN:]:
            raise IntegrityError(f"{what}: checksum mismatch (data is damaged)")
        return body  # type: ignore[return-value]  # a view: decompress copies it anyway


class AesGcmCipher(Cipher):
    suite = SUITE_AES256GCM
    HEADER = 1 + 16 + 8

    def __init__(self, master_key: bytes, session: bytes | None = None) -> None:
        """``session``: this writer's random id (default: fresh from os.urandom); only a
        test replaying a seeded case passes one — a repeated id repeats nonces."""
        if len(master_key) != 32:
            raise ValueError("master key must be 32 bytes")
        self._master = master_key
        self._session = os.urandom(16) if session is None else session
        if len(self._session) != 16:
            raise ValueError("session id must be 16 bytes")
        self._counter = itertools.count(1)  # next() is atomic under the GIL
        self._seal_key = self._derive(self._session)
        self._seal_aead = AESGCM(self._seal_key)
        self._open_cache: dict[bytes, AESGCM] = {}
        self._lock = threading.Lock()

    def _derive(self, session: bytes) -> bytes:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"diskvault-object-key-v1" + session)
        return hkdf.derive(self._master)

    def seal(self, aad: bytes, plaintext: bytes | memoryview) -> bytearray:
        n = next(self._counter)
        header = bytes([SUITE_AES256GCM]) + self._session + n.to_bytes(8, "little")
        nonce = n.to_bytes(12, "little")
        # encrypt straight into the output buffer: no copies of multi-MiB chunks
        out = bytearray(self.HEADER + len(plaintext) + TAG_LEN)
        out[: self.HEADER] = header
        self._seal_aead.encrypt_into(nonce, plaintext, header + aad,
                                     memoryview(out)[self.HEADER :])
        return out

    def seal_parts(self, aad: bytes, head: bytes, body: Buffer) -> list[Buffer]:
        """The same bytes as ``seal(aad, head + body)``, without joining head and body
        and without zeroing the output first: GCM's streaming API encrypts the two
        pieces one after the other into an uninitialised buffer (every byte of it is
        then written). Measured per 4 MiB chunk: 0.45 ms of CPU against 0.7 ms for the
        join, the zeroed bytearray and the one-shot call. The chunk write path only:
        the result is a memoryview, written with ``writev``."""
        n = next(self._counter)
        header = bytes([SUITE_AES256GCM]) + self._session + n.to_bytes(8, "little")
        size = self.HEADER + len(head) + len(body) + TAG_LEN
        out = np.empty(size, np.uint8).data
        out[: self.HEADER] = header
        enc = _StreamCipher(algorithms.AES(self._seal_key),
                            modes.GCM(n.to_bytes(12, "little"))).encryptor()
        enc.authenticate_additional_data(header + aad)
        # update_into wants 15 bytes of room beyond its input; the tag's place gives
        # it for the body, and the body's place for the head
        pos = self.HEADER
        pos += enc.update_into(head, out[pos : pos + len(head) + 15])
        pos += enc.update_into(body, out[pos:])
        enc.finalize()
        out[pos:] = enc.tag
        return [out]

    def open(self, aad: bytes, sealed: bytes | memoryview, what: str) -> bytearray:
        mv = memoryview(sealed)
        if len(mv) < self.HEADER + TAG_LEN or mv[0] != SUITE_AES256GCM:
            raise IntegrityError(f"{what}: damaged object header")
        header = bytes(mv[: self.HEADER])
        session, counter = header[1:17], header[17:25]
        aead = self._open_cache.get(session)
        if aead is None:
            with self._lock:
                if len(self._open_cache) > 4096:
                    self._open_cache.clear()
                aead = self._open_cache[session] = AESGCM(self._derive(session))
        nonce = counter + b"\x00\x00\x00\x00"
        try:
            out = bytearray(len(mv) - self.HEADER - TAG_LEN)
            aead.decrypt_into(nonce, mv[self.HEADER :], header + aad, out)
            return out
        except InvalidTag:
            raise IntegrityError(f"{what}: authentication failed (damaged or forged)") from None
