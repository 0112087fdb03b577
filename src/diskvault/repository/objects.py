"""Object format: compress, then seal (encrypt+authenticate), in this one place.

``seal(id, data)`` → bytes stored in a pack (chunks) or under a name (metadata).
``open(id, blob)`` → plaintext, raising IntegrityError naming the object.
For chunks, the plaintext's keyed hash is checked against the id as well, so a
bug or a forged object can never return wrong data as good.

``seal_chunk`` returns the sealed chunk as its parts (``Sealed``): packs are written
from them with ``writev``, so a chunk's bytes are not copied between reading and
writing. In format version 2 repositories without encryption, chunks are sealed as
suite 2 (no tag): the id check after opening already detects any damage, and
skipping the tag saves a full BLAKE3 pass over every stored byte (docs/format.md).
"""

from __future__ import annotations

from ..crypto.aead import SUITE_NONE, SUITE_NONE_ID_CHECKED, Buffer, Cipher
from ..crypto.ids import IdHasher
from ..errors import IntegrityError
from .compression import Compression, decompress


class Sealed:
    """A sealed object as the buffers it is made of, in order (never joined on the
    write path; ``bytes(sealed)`` joins them where one buffer is needed)."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: list[Buffer]) -> None:
        self.parts = parts
        self.size = sum(memoryview(p).nbytes for p in parts)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)


class ObjectCodec:
    def __init__(self, cipher: Cipher, id_hash: IdHasher, compression: Compression,
                 untagged_chunks: bool = False) -> None:
        self.cipher = cipher
        self.id_hash = id_hash
        self.compression = compression
        # suite 2 chunks: written and accepted only without encryption (nothing to
        # forge) and in format version 2 repositories (older readers don't know it)
        self.untagged_chunks = untagged_chunks and cipher.suite == SUITE_NONE

    def seal(self, obj_id: bytes, data: bytes | memoryview,
             compression: Compression | None = None) -> bytes | bytearray:
        comp = compression or self.compression
        return self.cipher.seal(obj_id, comp.compress(data))

    def seal_chunk(self, chunk_id: bytes, data: Buffer) -> Sealed:
        head, body = self.compression.encode(data)
        if self.untagged_chunks:
            return Sealed([bytes([SUITE_NONE_ID_CHECKED]) + head, body])
        return Sealed(self.cipher.seal_parts(chunk_id, head, body))

    def open(self, obj_id: bytes, blob: bytes | memoryview, what: str | None = None) -> bytes:
        what = what or f"object {obj_id.hex()[:16]}"
        return decompress(memoryview(self.cipher.open(obj_id, blob, what)), what)

    def open_chunk(self, chunk_id: bytes, blob: bytes | memoryview) -> bytes:
        what = f"chunk {chunk_id.hex()[:16]}"
        if self.untagged_chunks and blob[:1] == bytes([SUITE_NONE_ID_CHECKED]):
            data = decompress(memoryview(blob)[1:], what)
        else:
            data = self.open(chunk_id, blob, what)
        if self.id_hash(data) != chunk_id:
            raise IntegrityError(f"{what}: content does not match its id")
        return data
