"""What this client remembers about each repository, against a storage-only attacker.

Whoever can write to the storage can replace ``config`` (it is not encrypted), the
manifest of an unencrypted repository, or put back an old, validly sealed manifest. The
client therefore remembers, per repository id, in ``<security dir>/<repo id hex>/
security.json``:

    mode         the encryption mode it first saw (none, repokey, keyfile)
    fingerprint  a one-way hash of the key material (crypto/keys.py), never the key
    key_blob     a hash of the passphrase-wrapped key last seen to unwrap to that key:
                 ``key export`` recognises the genuine key without the passphrase
    location     where it last opened the repository (secrets masked)
    serial       the highest serial of a manifest that authenticated (encrypted only)

A repository whose mode or key changed is refused (a downgrade to ``none`` would
otherwise make the next ``create`` upload plaintext); an encrypted manifest older than
``serial`` is refused (rollback). The security dir lives under ``~/.config``, not in the
cache: deleting the cache must not lower the guard. ``$DISKVAULT_SECURITY_DIR``
overrides it. Deleting a repository's entry (the procedure the errors name) makes the
client trust the repository as it finds it next, as on first contact.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import blake3

from ..errors import EncryptionChanged, KeyChanged, ManifestRolledBack


def cache_dir() -> str:
    base = os.environ.get("DISKVAULT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "diskvault")
    return base


def security_dir() -> str:
    return os.environ.get("DISKVAULT_SECURITY_DIR") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"),
        "diskvault", "security")


def entry_dir(repo_id: bytes) -> str:
    """The directory holding what this client knows about one repository."""
    return os.path.join(security_dir(), repo_id.hex())


def _path(repo_id: bytes) -> str:
    return os.path.join(entry_dir(repo_id), "security.json")


def _legacy_path(repo_id: bytes) -> str:
    # before the security dir, the serial was kept in the cache dir: still honoured
    return os.path.join(cache_dir(), repo_id.hex(), "security.json")


@dataclass
class Known:
    mode: str = ""
    fingerprint: str = ""
    location: str = ""
    serial: int = 0
    key_blob: str = ""


def blob_digest(blob: bytes) -> str:
    """What is remembered of a wrapped key (it is only compared, never used)."""
    return blake3.blake3(blob).hexdigest()[:32] if blob else ""


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def load(repo_id: bytes) -> Known | None:
    """What this client knows about the repository; None: never seen (first contact)."""
    d = _read(_path(repo_id))
    legacy = _read(_legacy_path(repo_id))
    if not d and not legacy:
        return None
    try:
        serial = max(int(d.get("serial", 0)), int(legacy.get("serial", 0)))
    except (TypeError, ValueError):
        serial = 0
    return Known(mode=str(d.get("mode", "")), fingerprint=str(d.get("fingerprint", "")),
                 location=str(d.get("location", "")), serial=serial,
                 key_blob=str(d.get("key_blob", "")))


def last_serial(repo_id: bytes) -> int:
    """The highest authenticated manifest serial seen for this repository (0: never)."""
    k = load(repo_id)
    return k.serial if k else 0


def check_identity(repo_id: bytes, known: Known | None, mode: str, fingerprint: str | None,
                   location: str) -> None:
    """Refuse a repository whose encryption mode or key is not the one seen before.

    ``fingerprint`` is None before the key is loaded (the mode is judged first, so a
    downgraded repository is refused before anything is read through it).
    """
    if known is None:
        return
    if known.mode and known.mode != mode:
        raise EncryptionChanged(location, known.mode, mode, entry_dir(repo_id))
    if fingerprint is not None and known.fingerprint and known.fingerprint != fingerprint:
        raise KeyChanged(location, entry_dir(repo_id))


def check_serial(repo_id: bytes, serial: int, location: str) -> None:
    """Refuse an (authenticated) manifest older than one this client has already seen."""
    seen = last_serial(repo_id)
    if serial < seen:
        raise ManifestRolledBack(serial, seen, location, entry_dir(repo_id))


@contextlib.contextmanager
def _locked(p: str) -> Iterator[None]:
    # two diskvault processes on this host must not interleave read-compare-write,
    # or a slower one could lower the remembered serial again
    fd = os.open(p + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remember(repo_id: bytes, *, mode: str | None = None, fingerprint: str | None = None,
             location: str | None = None, serial: int | None = None,
             key_blob: bytes | None = None) -> None:
    """Record what was seen. Mode and fingerprint are set once (a change is refused
    before this is called); the serial only ever grows; ``key_blob`` (a wrapped key just
    seen to unwrap to the remembered key) replaces the one before: a new passphrase
    wraps the same key anew."""
    p = _path(repo_id)
    try:
        os.makedirs(os.path.dirname(p), mode=0o700, exist_ok=True)
        with _locked(p):
            old = load(repo_id) or Known()
            new = Known(mode=old.mode or (mode or ""),
                        fingerprint=old.fingerprint or (fingerprint or ""),
                        location=location if location is not None else old.location,
                        serial=max(old.serial, serial or 0),
                        key_blob=blob_digest(key_blob) if key_blob else old.key_blob)
            if new == old and os.path.exists(p):
                return
            tmp = f"{p}.tmp{os.getpid()}"
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                           "w") as f:
                json.dump(asdict(new), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
    except OSError:
        pass  # a read-only home must not stop a restore
