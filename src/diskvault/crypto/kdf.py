"""Passphrase stretching with Argon2id."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from argon2.low_level import Type, hash_secret_raw

# the cost new keys get: costly to brute-force, fine for a backup run (64 MiB, 3 passes);
# crypto/keys.py refuses keys asking for more than a real client would choose
NEW_KEY_COST: dict[str, int] = {"time_cost": 3, "memory_kib": 65536, "parallelism": 2}


@dataclass(frozen=True)
class KdfParams:
    salt: bytes
    time_cost: int
    memory_kib: int
    parallelism: int
    algorithm: str = "argon2id"

    @classmethod
    def new(cls) -> KdfParams:
        c = NEW_KEY_COST
        return cls(salt=os.urandom(16), time_cost=c["time_cost"], memory_kib=c["memory_kib"],
                   parallelism=c["parallelism"])

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
