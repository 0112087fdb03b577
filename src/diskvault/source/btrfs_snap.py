"""Read-only btrfs snapshots of the subvolumes holding backup sources (--snapshot btrfs).

A snapshot is taken of the subvolume that holds a path (the nearest directory above it
whose inode number is 256, btrfs's subvolume root), placed in that subvolume's root as
``.diskvault-snap-<boot id>-<pid>-<start time>-<random>``, and deleted after the backup.

Stale snapshots (diskvault was SIGKILLed, the machine crashed) are deleted by the next
``--snapshot btrfs`` run that touches the same subvolume. Safety: the name carries the
creator's identity — the kernel's boot id, its pid and its start time in clock ticks
since boot (/proc/PID/stat field 22). Within one boot a (pid, start time) pair names one
process only, so a snapshot is removed only when its creator is provably gone: another
boot, or no process with that pid and start time now. A live run's snapshot is never
touched; names that do not parse are never touched; only read-only btrfs subvolumes
are deleted, never a directory's content.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import subprocess

from ..errors import SnapshotError
from ..storage.node import process_gone, process_start, read_id

PREFIX = ".diskvault-snap-"
_NAME = re.compile(r"\.diskvault-snap-([0-9a-f]{32})-(\d+)-(\d+)-[0-9a-f]+\Z")
BTRFS_MAGIC = 0x9123683E
SUBVOL_ROOT_INO = 256


def boot_id() -> str:
    return read_id("/proc/sys/kernel/random/boot_id").replace("-", "")


def own_tag() -> str:
    pid = os.getpid()
    return f"{boot_id()}-{pid}-{process_start(pid)}"


def is_btrfs(path: str) -> bool:
    import ctypes
    import ctypes.util

    class _StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    buf = _StatFs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        e = ctypes.get_errno()
        raise SnapshotError(f"{path}: {os.strerror(e)}")
    return (buf.f_type & 0xFFFFFFFF) == BTRFS_MAGIC


def subvolume_root(path: str) -> str:
    """The root directory of the btrfs subvolume holding ``path``."""
    d = os.path.realpath(path)
    if not os.path.isdir(d):
        d = os.path.dirname(d)
    dev = os.stat(d).st_dev
    while True:
        st = os.stat(d)
        if st.st_ino == SUBVOL_ROOT_INO and st.st_dev == dev:
            return d
        parent = os.path.dirname(d)
        if parent == d or os.stat(parent).st_dev != dev:
            return d  # a mount of a subvolume's subdirectory: its top is what we see
        d = parent


def _is_subvolume(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_ino == SUBVOL_ROOT_INO


def _btrfs(*args: str) -> None:
    try:
        r = subprocess.run(["btrfs", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise SnapshotError("--snapshot btrfs needs the btrfs command (btrfs-progs)") from None
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        raise SnapshotError(f"btrfs {' '.join(args)}: {msg}")


def stale_snapshots(root: str) -> list[str]:
    """Snapshots under ``root`` whose creating process is provably gone."""
    boot = boot_id()
    out: list[str] = []
    try:
        names = os.listdir(root)
    except OSError:
        return out
    for n in names:
        m = _NAME.match(n)
        if not m or not _is_subvolume(os.path.join(root, n)):
            continue
        sboot, pid, started = m.group(1), int(m.group(2)), int(m.group(3))
        if sboot != boot or process_gone(pid, started):
            out.append(os.path.join(root, n))
    return out


def delete(path: str) -> None:
    _btrfs("subvolume", "delete", path)


class Snapshots:
    """Snapshots of the subvolumes holding some paths; ``path_in()`` maps into them."""

    def __init__(self) -> None:
        self.taken: dict[str, str] = {}  # subvolume root -> its snapshot

    def check(self, paths: list[str]) -> list[str]:
        """The subvolume roots of ``paths``; one clear error for a path not on btrfs."""
        roots = []
        for p in paths:
            if not os.path.exists(p):
                raise SnapshotError(f"{p}: no such file or directory")
            if not is_btrfs(p):
                raise SnapshotError(f"{p} is not on a btrfs filesystem: --snapshot btrfs "
                                    "cannot snapshot it")
            r = subvolume_root(p)
            if r not in roots:
                roots.append(r)
        return roots

    def clean_stale(self, roots: list[str]) -> list[str]:
        removed = []
        for r in roots:
            for s in stale_snapshots(r):
                delete(s)
                removed.append(s)
        return removed

    def take(self, roots: list[str]) -> None:
        tag = own_tag()
        for r in roots:
            snap = os.path.join(r, f"{PREFIX}{tag}-{secrets.token_hex(4)}")
            _btrfs("subvolume", "snapshot", "-r", r, snap)
            self.taken[r] = snap

    def path_in(self, path: str) -> str:
        """Where ``path`` is inside its snapshot."""
        # the directory part resolved (roots are real paths); the last name kept, so a
        # symlink given as a source stays a symlink
        real = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))),
                            os.path.basename(os.path.abspath(path)))
        for root, snap in self.taken.items():
            if real == root or real.startswith(root.rstrip("/") + "/"):
                return os.path.join(snap, os.path.relpath(real, root))
        raise SnapshotError(f"{path}: no snapshot holds it")  # a bug: check() saw every path

    def remove(self) -> list[str]:
        """Delete every snapshot taken; return one message per failure (not raised: the
        caller is often on its way out with another error)."""
        errors = []
        for snap in list(self.taken.values()):
            try:
                delete(snap)
            except SnapshotError as e:
                errors.append(str(e))
        self.taken.clear()
        return errors
