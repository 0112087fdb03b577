"""Freezing host filesystems for the time a backup reads them (--fsfreeze MOUNTPOINT).

What a freeze can give: while frozen (FIFREEZE), a filesystem is clean on disk and no
file on it changes, so files and images on it — and the block device under it — read
as one point in time. What it cannot: a cheap copy *during* the freeze. A reflink copy
(`cp --reflink`, FICLONE) or a btrfs snapshot is itself a write, which the freeze blocks,
so "freeze, copy, thaw" deadlocks. diskvault therefore keeps the filesystem frozen for
the whole read of the sources on it, bounded by ``--fsfreeze-timeout``; on btrfs,
``--snapshot btrfs`` gives a point in time without holding writers at all.

Writers on a frozen filesystem sleep uninterruptibly, so the freeze is undone on every
path: by ``thaw()`` in the caller's ``finally``, by a watchdog process (watchdog.py) when
diskvault dies — even by SIGKILL — and by that watchdog at the deadline. A read that
outlives the deadline is not a point in time any more: ``check()`` then fails the
backup before anything is committed.

Never frozen: ``/``, and the filesystem of anything diskvault needs while the freeze
lasts (the repository if local, cache, key and security dirs, its own code, Python):
freezing those would hang diskvault itself. Filesystems are compared by superblock
(the device numbers /proc/self/mountinfo shows), so bind mounts and btrfs subvolumes
of a protected filesystem are caught too.
"""

from __future__ import annotations

import fcntl
import os
import time

from ..errors import FreezeError
from .watchdog import FIFREEZE, Watchdog, thaw_fd

# what this process holds frozen: such a filesystem does not change while it is read,
# so a mounted device under it is as good as read-only (paths.writable_mounts asks)
_FROZEN: set[str] = set()


def frozen_by_us(mountpoint: str) -> bool:
    return os.path.realpath(mountpoint) in _FROZEN


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, major:minor of its superblock, fs type) from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            mp = parts[4].encode().decode("unicode_escape")
            out.append((mp, parts[2], parts[sep + 1]))
    return out


def mount_of(path: str, mounts: list[tuple[str, str, str]] | None = None
             ) -> tuple[str, str, str]:
    """The mount holding ``path`` (its deepest, last-mounted mount point)."""
    real = os.path.realpath(path)
    while not os.path.exists(real):  # a path not created yet: its nearest ancestor
        real = os.path.dirname(real)
    best = ("/", "", "")
    for m in mounts if mounts is not None else _mounts():
        mp = m[0]
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best[0]):
            best = m
    return best


class Freezes:
    def __init__(self, mountpoints: list[str], timeout: float) -> None:
        self.mountpoints = [os.path.realpath(m) for m in mountpoints]
        self.timeout = timeout
        self.deadline: float | None = None
        self.frozen: list[tuple[str, int, Watchdog]] = []

    def check(self, protect: dict[str, str]) -> None:
        """Refuse what must not be frozen; ``protect`` maps a description to a path."""
        mounts = _mounts()
        points = {m[0]: m for m in mounts}
        for mp in self.mountpoints:
            if mp == "/":
                raise FreezeError("refusing to freeze /: diskvault and everything else "
                                  "would hang on it")
            if mp not in points or not os.path.ismount(mp):
                raise FreezeError(f"--fsfreeze {mp}: not a mount point")
            dev = points[mp][1]
            for what, path in protect.items():
                if mount_of(path, mounts)[1] == dev:
                    raise FreezeError(f"refusing to freeze {mp}: it holds {what} ({path}), "
                                      "which diskvault needs while the freeze lasts")

    def freeze(self) -> None:
        self.deadline = time.monotonic() + self.timeout
        for mp in self.mountpoints:
            try:
                fd = os.open(mp, os.O_RDONLY | os.O_DIRECTORY)
            except OSError as e:
                raise FreezeError(f"--fsfreeze {mp}: {e.strerror}") from None
            try:  # armed first: from the freeze on, someone always thaws
                dog = Watchdog({"thaw": mp}, self.deadline)
            except OSError as e:
                os.close(fd)
                raise FreezeError(f"--fsfreeze {mp}: {e}") from None
            try:
                fcntl.ioctl(fd, FIFREEZE, 0)
            except OSError as e:
                dog.release()
                os.close(fd)
                why = ("this filesystem cannot be frozen" if e.errno == 95 else e.strerror)
                raise FreezeError(f"--fsfreeze {mp}: {why}") from None
            self.frozen.append((mp, fd, dog))
            _FROZEN.add(mp)

    def check_deadline(self) -> None:
        """Fail when the time limit ran out: the watchdog has thawed (or is thawing), so
        what was read is not one point in time."""
        if self.frozen and self.deadline is not None and time.monotonic() >= self.deadline:
            raise FreezeError(
                f"the read took longer than --fsfreeze-timeout {self.timeout:g} s: "
                f"{', '.join(m for m, _, _ in self.frozen)} was thawed during the read, so "
                "the backup would not be one point in time; nothing was stored (raise the "
                "timeout, or use --snapshot btrfs)")

    def thaw(self) -> list[str]:
        """Thaw everything frozen, last first; one message per failure (never raises)."""
        errors = []
        while self.frozen:
            mp, fd, dog = self.frozen.pop()
            _FROZEN.discard(mp)
            ok, detail = dog.release(timeout=30)
            if not ok:  # the watchdog died or hung: thaw ourselves
                ok, detail = thaw_fd(fd)
            os.close(fd)
            if not ok:
                errors.append(f"{mp}: {detail}")
        return errors
