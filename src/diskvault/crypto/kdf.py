"""Passphrase stretching with Argon2id."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from argon2.low_level import Type, hash_secret_raw


@dataclass(frozen=True)
class KdfParams:
    salt: bytes
    time_cost: int = 3
    memory_kib: int = 65536  # 64 MiB: costly to brute-force, fine for a backup run
    parallelism: int = 2
    algorithm: str = "argon2id"

    @classmethod
    def new(cls) -> KdfParams:
        if os.environ.get("DISKVAULT_TESTONLY_WEAKEN_KDF"):
            # tests create hundreds of keys; never set this for real repositories
            return cls(salt=os.urandom(16), time_cost=1, memory_kib=64, parallelism=1)
        return cls(salt=os.urandom(16))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> KdfParams:
        return cls(**{k: d[k] for k in ("salt", "time_cost", "memory_kib", "parallelism",
                                        "algorithm")})


def derive_key(passphrase: str, params: KdfParams) -> bytes:
    if params.algorithm != "argon2id":
        raise ValueError(f"unknown KDF {params.algorithm}")
    return hash_secret_raw(
        passphrase.encode("utf-8"),
        params.salt,
        time_cost=params.time_cost,
        memory_cost=params.memory_kib,
        parallelism=params.parallelism,
        hash_len=32,
        type=Type.ID,
    )
