"""Key material and its passphrase-wrapped form (repokey in the repo, keyfile on disk).

Wrapped key blob (msgpack): {version, repo_id, kdf: {...}, nonce, wrapped} where
``wrapped`` = AES-256-GCM(Argon2id(passphrase), nonce, msgpack(secret keys), aad=repo_id).
A wrong passphrase and a damaged blob both fail authentication: one clear error.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from dataclasses import dataclass

import blake3
import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import IntegrityError, PassphraseWrong
from .kdf import KdfParams, derive_key

KEY_VERSION = 1
KEYFILE_HEADER = "DISKVAULT KEY"
MAX_KDF_MEMORY_KIB = 2 << 20  # 2 GiB
MAX_KDF_TIME_COST = 10


@dataclass(frozen=True)
class KeyMaterial:
    enc_key: bytes  # AES-256-GCM master key (per-session keys are derived from it)
    id_key: bytes  # BLAKE3 key for chunk ids

    @classmethod
    def generate(cls, random_bytes: Callable[[int], bytes] = os.urandom) -> KeyMaterial:
        return cls(enc_key=random_bytes(32), id_key=random_bytes(32))

    def fingerprint(self) -> str:
        """A one-way fingerprint of the key material, to recognise the key again
        (security.py); it reveals nothing usable about the keys."""
        h = blake3.blake3(self.enc_key + self.id_key,
                          derive_key_context="diskvault 2026-11 key fingerprint")
        return h.hexdigest()[:32]


def wrap_key(km: KeyMaterial, repo_id: bytes, passphrase: str) -> bytes:
    params = KdfParams.new()
    kek = derive_key(passphrase, params)
    nonce = os.urandom(12)
    secret = msgpack.packb({"enc_key": km.enc_key, "id_key": km.id_key})
    wrapped = AESGCM(kek).encrypt(nonce, secret, repo_id)
    return msgpack.packb({
        "version": KEY_VERSION, "repo_id": repo_id, "kdf": params.to_dict(),
        "nonce": nonce, "wrapped": wrapped,
    })


def unwrap_key(blob: bytes, repo_id: bytes | None, passphrase: str) -> KeyMaterial:
    try:
        d = msgpack.unpackb(blob)
        if d["version"] != KEY_VERSION:
            raise IntegrityError(f"key has unknown version {d['version']}")
        if repo_id is not None and d["repo_id"] != repo_id:
            raise IntegrityError("this key belongs to another repository")
        params = KdfParams.from_dict(d["kdf"])
        # bound the KDF cost a hostile key blob can demand to what a client would
        # choose: 2 GiB, 10 passes (the default is 64 MiB, 3 passes)
        if not (0 < params.memory_kib <= MAX_KDF_MEMORY_KIB
                and 0 < params.time_cost <= MAX_KDF_TIME_COST
                and 0 < params.parallelism <= 16):
            raise IntegrityError("key has unreasonable KDF parameters")
        kek = derive_key(passphrase, params)
        secret = AESGCM(kek).decrypt(d["nonce"], d["wrapped"], d["repo_id"])
    except InvalidTag:
        raise PassphraseWrong() from None
    except IntegrityError:
        raise
    except Exception as e:  # noqa: BLE001 - any malformed blob is one clean error
        raise IntegrityError(f"key data is damaged ({type(e).__name__})") from None
    s = msgpack.unpackb(secret)
    return KeyMaterial(enc_key=s["enc_key"], id_key=s["id_key"])


def blob_repo_id(blob: bytes) -> bytes:
    try:
        return msgpack.unpackb(blob)["repo_id"]
    except Exception:  # noqa: BLE001
        raise IntegrityError("key data is damaged") from None


def keyfile_text(blob: bytes, repo_id: bytes) -> str:
    b64 = base64.b64encode(blob).decode()
    lines = [b64[i : i + 76] for i in range(0, len(b64), 76)]
    return f"{KEYFILE_HEADER} {repo_id.hex()}\n" + "\n".join(lines) + "\n"


def parse_keyfile_text(text: str) -> tuple[bytes, bytes]:
    """Return (repo_id, blob) of a key file's text."""
    lines = text.strip().splitlines()
    if not lines or not lines[0].startswith(KEYFILE_HEADER + " "):
        raise IntegrityError("not a diskvault key file")
    try:
        repo_id = bytes.fromhex(lines[0].split()[-1])
        blob = base64.b64decode("".join(lines[1:]), validate=True)
    except ValueError:
        raise IntegrityError("key file is damaged") from None
    return repo_id, blob
