"""Mount points: checks before mounting, kernel mounts of trees TSK cannot read, umount.

A filesystem The Sleuth Kit cannot read (XFS, btrfs) is mounted by the kernel, read-only
and without journal replay, from the item's file in our own FUSE mount through a
read-only loop device (``mount -o ro,loop``: the loop device is freed with the mount),
onto its ``ITEM.files`` directory. ``umount`` takes those down first, deepest first,
then the FUSE mount — also after the mount process was killed (the FUSE connection is
then dead, and only the kernel's bookkeeping is left to clean).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable

from ..errors import DiskvaultError, MountError
from .innerfs import KERNEL_MOUNT_OPTIONS, Inner
from .namespace import ArchiveTree

PID_XATTR = "user.diskvault.pid"  # the mount's root answers with the serving process id
PROCESS_EXIT_WAIT = 60.0


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(path: str) -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount at or below ``path``, in mount order."""
    path = os.path.realpath(path)
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mp = _unescape(left.split()[4])
            fstype = right.split()[0] if right else ""
            if mp == path or mp.startswith(path.rstrip("/") + "/"):
                out.append((mp, fstype))
    return out


def is_fuse_mount(path: str) -> bool:
    real = os.path.realpath(path)
    return any(mp == real and t.startswith("fuse") for mp, t in mounts_under(real))


def check_mountpoint(path: str) -> str:
    """The absolute mount point, or MountError if it cannot take a mount now."""
    real = os.path.realpath(path)
    if not os.path.lexists(path):
        raise MountError(f"mount point {path} does not exist")
    if any(mp == real for mp, _ in mounts_under(real)):
        raise MountError(f"mount point {path} is busy: something is mounted there already")
    if not os.path.isdir(real):
        raise MountError(f"mount point {path} is not a directory")
    return real


def kernel_mount(source_file: str, target_dir: str, inner: Inner, whole_item: bool
                 ) -> None:
    """Mount the filesystem in ``source_file`` (bytes ``inner.offset ..`` of it) read-only
    on ``target_dir``; MountError with mount's own message if the kernel refuses."""
    opts = f"{KERNEL_MOUNT_OPTIONS[inner.fs_type or '']},loop"
    if not whole_item:
        opts += f",offset={inner.offset},sizelimit={inner.size}"
    cmd = ["mount", "-t", inner.fs_type or "auto", "-o", opts, source_file, target_dir]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        msg = [m.strip() for m in (r.stderr or r.stdout).splitlines() if m.strip()]
        raise MountError(f"read-only kernel mount of {source_file} failed: "
                         f"{msg[0] if msg else 'exit ' + str(r.returncode)}")


def mount_kernel_trees(mountpoint: str, prefix: str, tree: ArchiveTree,
                       note: Callable[[str], None]) -> None:
    """Kernel-mount every tree of ``tree`` TSK cannot read (the archive is at
    ``mountpoint/prefix``); called once the FUSE mount serves, never from a request."""
    tree.probe_all()
    base = os.path.join(mountpoint, prefix)
    for item_path, inner, tree_path in tree.kernel_mounts():
        try:
            kernel_mount(os.path.join(base, item_path), os.path.join(base, tree_path), inner,
                         whole_item=inner.offset == 0)
            note(f"{os.path.join(prefix, tree_path)}: {inner.fs_type} mounted by the kernel "
                 "(read-only, through a loop device)")
        except DiskvaultError as e:
            note(str(e))


def busy_users(path: str) -> list[int]:
    """Processes with a file, working directory or root inside ``path`` (as fuser -m)."""
    real = os.path.realpath(path).rstrip("/")
    me, pids = os.getpid(), []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        if int(pid) == me:
            continue
        links = [f"/proc/{pid}/cwd", f"/proc/{pid}/root"]
        try:
            links += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            pass
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target == real or target.startswith(real + "/"):
                pids.append(int(pid))
                break
    return pids


def unmount(path: str) -> None:
    """Take down a diskvault mount and the kernel mounts on top of it."""
    real = os.path.realpath(path)
    mounts = mounts_under(real)
    if not any(mp == real for mp, _ in mounts):
        raise MountError(f"{path} is not mounted")
    if not any(mp == real and t.startswith("fuse") for mp, t in mounts):
        raise MountError(f"{path} is not a diskvault (FUSE) mount")
    users = busy_users(real)
    if users:
        raise MountError(f"{path} is busy: in use by process "
                         f"{', '.join(map(str, users[:8]))}; close those files or leave "
                         "that directory, then retry")
    try:  # the serving process, if alive: it ends (and drops its lock) after the unmount
        pid: int | None = int(os.getxattr(real, PID_XATTR))
    except (OSError, ValueError):
        pid = None
    for mp, _ in reversed([m for m in mounts if m[0] != real]):
        _run_umount(["umount", mp], path)
    if os.geteuid() == 0 or not shutil.which("fusermount3"):
        _run_umount(["umount", real], path)
    else:
        _run_umount(["fusermount3", "-u", real], path)
    if pid is not None:
        _wait_gone(pid, PROCESS_EXIT_WAIT)


def _wait_gone(pid: int, deadline: float) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return  # ended; its parent has yet to reap it
        except (OSError, IndexError):
            return
        time.sleep(0.02)
    raise MountError(f"unmounted, but the mount process {pid} has not ended after "
                     f"{deadline:.0f} s")


def _run_umount(cmd: list[str], path: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        text = msg[-1] if msg else f"exit {r.returncode}"
        if "busy" in text:
            raise MountError(f"{path} is busy ({text}): close the files open in it, "
                             "then retry")
        raise MountError(f"cannot unmount {path}: {text}")
