"""Repository locations: a path, ``file://PATH``, ``sftp://…`` or ``s3:…`` → a Store."""

from __future__ import annotations

from ..errors import UsageError
from .base import Store
from .local import LocalStore


def open_store(location: str) -> Store:
    """Return the backend for a repository location (without touching the network yet)."""
    if location.startswith("file://"):
        return LocalStore(location[len("file://") :])
    if location.startswith(("sftp://", "s3:")):
        raise UsageError(f"remote repositories are not supported yet: {location}")
    if "://" in location:
        raise UsageError(f"unknown repository URL scheme: {location}")
    return LocalStore(location)
