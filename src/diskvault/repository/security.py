"""What this client remembers about each repository, to detect rollback and swaps.

Per repository id, ``<cache dir>/<id>/security.json`` holds the highest manifest serial
this client has seen. An encrypted repository whose manifest is older is refused: the
manifest was rolled back or replaced by an old copy (its AEAD tag is still valid).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator

from ..errors import IntegrityError


def cache_dir() -> str:
    base = os.environ.get("DISKVAULT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "diskvault")
    return base


def _path(repo_id: bytes) -> str:
    return os.path.join(cache_dir(), repo_id.hex(), "security.json")


def last_serial(repo_id: bytes) -> int:
    """The highest manifest serial seen for this repository (0: never seen)."""
    try:
        with open(_path(repo_id)) as f:
            return int(json.load(f).get("serial", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def check_serial(repo_id: bytes, serial: int, encrypted: bool) -> None:
    """Refuse a manifest older than one this client has already seen."""
    seen = last_serial(repo_id)
    if encrypted and serial < seen:
        raise IntegrityError(
            f"manifest serial {serial} is older than the last seen ({seen}): the repository "
            "was rolled back or replaced"
        )


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


def remember_serial(repo_id: bytes, serial: int) -> None:
    p = _path(repo_id)
    try:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with _locked(p):
            if serial <= last_serial(repo_id):
                return
            tmp = f"{p}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"serial": serial}, f)
            os.replace(tmp, p)
    except OSError:
        pass  # a read-only home must not stop a restore
