"""What this client remembers about each repository, to detect rollback and swaps."""

from __future__ import annotations

import json
import os

from ..errors import IntegrityError


def cache_dir() -> str:
    base = os.environ.get("DISKVAULT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "diskvault")
    return base


def _path(repo_id: bytes) -> str:
    return os.path.join(cache_dir(), repo_id.hex(), "security.json")


def check_serial(repo_id: bytes, serial: int, encrypted: bool) -> None:
    """Refuse a manifest older than one this client has already seen."""
    try:
        with open(_path(repo_id)) as f:
            seen = int(json.load(f).get("serial", 0))
    except (OSError, ValueError):
        return
    if encrypted and serial < seen:
        raise IntegrityError(
            f"manifest serial {serial} is older than the last seen ({seen}): the repository "
            "was rolled back or replaced"
        )


def remember_serial(repo_id: bytes, serial: int) -> None:
    p = _path(repo_id)
    try:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        try:
            with open(p) as f:
                seen = int(json.load(f).get("serial", 0))
        except (OSError, ValueError):
            seen = 0
        if serial > seen:
            tmp = p + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"serial": serial}, f)
            os.replace(tmp, p)
    except OSError:
        pass  # a read-only home must not stop a restore
