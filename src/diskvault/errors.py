"""Every error a user can see, one class each, with the message they read.

The CLI prints ``diskvault: error: <message>`` and exits with ``exit_code``;
nothing below the CLI prints or exits. Raise the most specific class.
"""

from __future__ import annotations


class DiskvaultError(Exception):
    """Base class: an error with a one-line message meant for the user."""

    exit_code = 2

    def __str__(self) -> str:
        return " ".join(str(a) for a in self.args) if self.args else type(self).__name__


class UsageError(DiskvaultError):
    """The command line is wrong (bad option value, missing argument)."""


class SourceError(DiskvaultError):
    """A backup source cannot be read: missing path, unreadable device, FIFO timeout."""


class TargetError(DiskvaultError):
    """A restore target cannot be written: too small, mounted, disk full."""


# --- repository -------------------------------------------------------------


class RepositoryError(DiskvaultError):
    """Something is wrong with the repository as a whole."""


class RepositoryNotFound(RepositoryError):
    def __init__(self, location: str, missing: bool = False) -> None:
        super().__init__(f"{location} does not exist" if missing
                         else f"{location} is not a diskvault repository")


class RepositoryExists(RepositoryError):
    def __init__(self, location: str) -> None:
        super().__init__(f"a repository (or other data) already exists at {location}")


class UnsupportedVersion(RepositoryError):
    def __init__(self, what: str, found: object, supported: object) -> None:
        super().__init__(
            f"{what} has format version {found}, this diskvault understands {supported}: "
            "upgrade diskvault"
        )


class IntegrityError(RepositoryError):
    """Data read from the repository is damaged, truncated or forged."""


class ObjectMissing(IntegrityError):
    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is missing from the repository")


class SecurityError(RepositoryError):
    """The repository is not the one this client remembers (security.py): refused."""


class EncryptionChanged(SecurityError):
    def __init__(self, location: str, was: str, now: str, entry: str) -> None:
        super().__init__(
            f"{location}: the repository was {was!r} when this client last used it and now "
            f"claims encryption {now!r}: refused (its storage may have been tampered with; "
            f"if it was really re-created with the same id, delete {entry})")


class KeyChanged(SecurityError):
    def __init__(self, location: str, entry: str) -> None:
        super().__init__(
            f"{location}: the repository's key is not the one this client used before: "
            f"refused (its storage may have been tampered with; if you replaced the key on "
            f"purpose, delete {entry})")


class UnencryptedWithKeyfile(SecurityError):
    def __init__(self, location: str, keyfile: str) -> None:
        super().__init__(
            f"{location} claims to be unencrypted, but this client has a key file for it "
            f"({keyfile}): refused (its storage may have been tampered with)")


class ManifestRolledBack(IntegrityError):
    def __init__(self, serial: int, seen: int, location: str, entry: str) -> None:
        super().__init__(
            f"manifest serial {serial} is older than the last seen ({seen}): {location} was "
            f"rolled back or replaced by an older copy; if you restored it from a copy on "
            f"purpose, delete {entry} and run the command again")


class StorageError(RepositoryError):
    """The storage backend failed (I/O error, network, permissions, disk full)."""


class StorageFull(StorageError):
    def __init__(self, where: str) -> None:
        super().__init__(f"no space left on the repository storage ({where})")


class LockError(RepositoryError):
    """The repository is locked by another process."""


class AppendOnlyError(RepositoryError):
    def __init__(self, action: str) -> None:
        super().__init__(f"repository is append-only: {action} is not allowed")


# --- archives ----------------------------------------------------------------


class ArchiveError(DiskvaultError):
    pass


class ArchiveExists(ArchiveError):
    def __init__(self, name: str) -> None:
        super().__init__(f"archive {name!r} already exists")


class ArchiveNotFound(ArchiveError):
    def __init__(self, name: str) -> None:
        super().__init__(f"archive {name!r} does not exist")


class ArchiveIncomplete(IntegrityError):
    """A ``check --repair`` lost item metadata of this archive: the items in it are gone,
    so a restore of "the archive" cannot be complete (names no range: none is known)."""

    def __init__(self, loss: str, remedy: str = "") -> None:
        super().__init__(f"{loss}{'; ' + remedy if remedy else ''}")


# --- keys --------------------------------------------------------------------


class KeyError_(DiskvaultError):
    """Key material problems (named with a trailing underscore: KeyError is builtin)."""


class PassphraseWrong(KeyError_):
    def __init__(self) -> None:
        super().__init__("passphrase is wrong (or the key is damaged)")


class KeyFileMissing(KeyError_):
    def __init__(self, path: str) -> None:
        super().__init__(f"key file for this repository not found: {path}")


class PassphraseEmpty(KeyError_):
    def __init__(self) -> None:
        super().__init__(
            "the new passphrase is empty (an unset shell variable?): refused; set "
            "DISKVAULT_PASSPHRASE_EMPTY_OK=1 if you really want no passphrase")


class PassphraseMissing(KeyError_):
    def __init__(self) -> None:
        super().__init__(
            "a passphrase is needed: set DISKVAULT_PASSPHRASE or DISKVAULT_PASSCOMMAND, "
            "or run in a terminal"
        )


# --- disks and filesystems ---------------------------------------------------


class DiskError(DiskvaultError):
    """Disk selection or partition-table problems."""


class BlockMapError(DiskvaultError):
    """A filesystem could not be parsed with certainty; callers fall back to 'all used'."""


class VmError(DiskvaultError):
    """QEMU (over QMP) refused or failed a step of working with a running VM."""


class MountError(DiskvaultError):
    """A mount point cannot be mounted or unmounted (missing, busy, not ours)."""


class Warning_(DiskvaultError):
    """A condition that completes the command but ends it with exit code 1."""

    exit_code = 1


# --- points in time on the host (--snapshot, --fsfreeze, --pre/--post-command) ---------


class SnapshotError(SourceError):
    """A filesystem snapshot could not be taken or a path is not on a snapshotable fs."""


class FreezeError(SourceError):
    """A filesystem could not (or must not) be frozen, or stayed frozen too long."""


class HookError(DiskvaultError):
    """A --pre-command failed: nothing was read."""
