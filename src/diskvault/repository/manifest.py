"""The manifest: the one mutable object, naming every committed archive.

Sealed with aad ``b"manifest"`` (so it cannot be swapped for another object) and
carrying a serial number that only grows; clients remember the highest serial seen
per repository (``security.py``) and refuse an older manifest (rollback).
It also records the hash of the repository config, so a tampered config is caught.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgpack

from ..errors import IntegrityError, UnsupportedVersion

MANIFEST_VERSION = 1
MANIFEST_AAD = b"manifest"


@dataclass
class ArchiveRef:
    name: str
    id: bytes
    time: float


@dataclass
class Manifest:
    serial: int = 0
    time: float = 0.0
    config_hash: bytes = b""
    archives: dict[str, ArchiveRef] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return msgpack.packb({
            "version": MANIFEST_VERSION, "serial": self.serial, "time": self.time,
            "config_hash": self.config_hash,
            "archives": [[a.name, a.id, a.time] for a in self.archives.values()],
        })

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            d = msgpack.unpackb(data)
            version = d["version"]
        except Exception:  # noqa: BLE001
            raise IntegrityError("manifest is malformed") from None
        if version != MANIFEST_VERSION:
            raise UnsupportedVersion("manifest", version, MANIFEST_VERSION)
        try:
            archives = {str(n): ArchiveRef(str(n), bytes(i), float(t)) for n, i, t in d["archives"]}
            return cls(int(d["serial"]), float(d["time"]), bytes(d["config_hash"]), archives)
        except Exception:  # noqa: BLE001
            raise IntegrityError("manifest is malformed") from None

    def bump(self) -> None:
        self.serial += 1
        self.time = time.time()

    def sorted_archives(self) -> list[ArchiveRef]:
        return sorted(self.archives.values(), key=lambda a: (a.time, a.name))
