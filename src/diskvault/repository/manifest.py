"""The manifest: the one mutable object, naming every committed archive.

Sealed with aad ``b"manifest"`` (so it cannot be swapped for another object) and
carrying a serial number that only grows; clients remember the highest serial seen
per repository (``security.py``) and refuse an older manifest (rollback).
It also records the hash of the repository config, so a tampered config is caught;
while the config is being changed, ``pending_config_hash`` names the new config too,
so a crash between writing the config and the manifest leaves an accepted pair.
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
    pending_config_hash: bytes = b""

    def to_bytes(self) -> bytes:
        d = {
            "version": MANIFEST_VERSION, "serial": self.serial, "time": self.time,
            "config_hash": self.config_hash,
            "archives": [[a.name, a.id, a.time] for a in self.archives.values()],
        }
        if self.pending_config_hash:
            d["pending_config_hash"] = self.pending_config_hash
        return msgpack.packb(d)

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
            archives: dict[str, ArchiveRef] = {}
            for n, i, t in d["archives"]:
                # exact types: bytes(<int>) would allocate that many bytes
                if not isinstance(n, str) or not n or not _is_id(i) \
                        or not isinstance(t, int | float) or n in archives:
                    raise ValueError
                archives[n] = ArchiveRef(n, i, float(t))
            serial, when = d["serial"], d["time"]
            config_hash, pending = d["config_hash"], d.get("pending_config_hash", b"")
            if not isinstance(serial, int) or not isinstance(when, int | float) \
                    or not isinstance(config_hash, bytes) or not isinstance(pending, bytes):
                raise ValueError
            return cls(serial, float(when), config_hash, archives, pending)
        except Exception:  # noqa: BLE001
            raise IntegrityError("manifest is malformed") from None

    def bump(self) -> None:
        self.serial += 1
        self.time = time.time()

    def sorted_archives(self) -> list[ArchiveRef]:
        return sorted(self.archives.values(), key=lambda a: (a.time, a.name))


def _is_id(v: object) -> bool:
    return isinstance(v, bytes) and len(v) == 32
