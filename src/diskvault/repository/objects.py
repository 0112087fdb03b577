"""Object format: compress, then seal (encrypt+authenticate), in this one place.

``seal(id, data)`` → bytes stored in a pack (chunks) or under a name (metadata).
``open(id, blob)`` → plaintext, raising IntegrityError naming the object.
For chunks, the plaintext's keyed hash is checked against the id as well, so a
bug or a forged object can never return wrong data as good.
"""

from __future__ import annotations

from ..crypto.aead import Cipher
from ..crypto.ids import IdHasher
from ..errors import IntegrityError
from .compression import Compression, decompress


class ObjectCodec:
    def __init__(self, cipher: Cipher, id_hash: IdHasher, compression: Compression) -> None:
        self.cipher = cipher
        self.id_hash = id_hash
        self.compression = compression

    def seal(self, obj_id: bytes, data: bytes | memoryview,
             compression: Compression | None = None) -> bytes:
        comp = compression or self.compression
        return self.cipher.seal(obj_id, comp.compress(data))

    def open(self, obj_id: bytes, blob: bytes | memoryview, what: str | None = None) -> bytes:
        what = what or f"object {obj_id.hex()[:16]}"
        return decompress(self.cipher.open(obj_id, blob, what), what)

    def open_chunk(self, chunk_id: bytes, blob: bytes | memoryview) -> bytes:
        what = f"chunk {chunk_id.hex()[:16]}"
        data = self.open(chunk_id, blob, what)
        if self.id_hash(data) != chunk_id:
            raise IntegrityError(f"{what}: content does not match its id")
        return data
