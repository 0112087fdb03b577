"""``vm backup``: each disk of a running QEMU guest into a disk archive, all disks at
one point in time, reading only what the dirty bitmaps mark.

One archive per disk: a VM with one disk (or one chosen with ``--drive``) gets the name
given; with several, each archive is ``NAME.<drive>``. Every archive of a run records
``vm`` metadata (the VM's identity, the disk, the run's id and point in time, the
bitmap that now tracks changes since it), and is an ordinary disk archive: ``disk
restore``, ``extract --stdout``, mount and NBD work on it unchanged.

The parent of a disk's archive is the newest archive of the same VM disk in this
repository. Its bitmap, if QEMU still has it and it can be trusted (present, not
inconsistent, disk size and image file unchanged), gives the changed extents: the rest
is taken from the parent unread (``ChangedRanges``). Otherwise the disk is read whole —
still compared block by block with the parent, so only changed blocks are stored — and
the reason is reported. Never a wrong archive: a bitmap is only ever trusted for the
archive that recorded its name.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ArchiveExists, IntegrityError, ObjectMissing, UsageError
from ..repository.repo import Repository
from ..source.guestfreeze import GuestFreeze
from ..source.qmp import QmpClient
from ..source.vm import (
    Drive,
    Snapshot,
    list_drives,
    remove_leftovers,
    settle_bitmaps,
    vm_identity,
)
from .create import CreateOptions
from .disk import DiskBackupResult, DiskSource, backup_disk, plan_backup
from .parent import ChangedRanges, ParentArchive


@dataclass
class DriveResult:
    drive: str
    archive: str
    mode: str  # "incremental" or "full"
    reason: str  # why full
    size: int
    dirty: int  # bytes the bitmap marked (incremental)
    result: DiskBackupResult


@dataclass
class VmBackupResult:
    vm: str
    consistency: str = "crash"  # "application": filesystems frozen by the guest agent
    frozen: int = 0  # filesystems the agent froze
    drives: list[DriveResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _source_id(vm_key: str, d: Drive) -> dict:
    return {"vm": vm_key, "drive": d.name}


def _find_parent(repo: Repository, vm_key: str, d: Drive) -> tuple[str, dict] | None:
    """The newest archive of this VM disk: (name, its ``vm`` metadata)."""
    want = _source_id(vm_key, d)
    for ref in reversed(repo.manifest.sorted_archives()):
        try:
            meta = repo.load_archive(ref)
        except (IntegrityError, ObjectMissing):
            continue
        if meta.get("source_id") == want and isinstance(meta.get("vm"), dict):
            return ref.name, meta
    return None


def backup_vm(repo: Repository, q: QmpClient, qmp_path: str, name: str, opts: CreateOptions,
              drive_names: list[str] | None = None, freeze: GuestFreeze | None = None,
              note: Callable[[str], None] | None = None) -> VmBackupResult:
    vm_key = vm_identity(q, qmp_path)
    result = VmBackupResult(vm_key)
    say = note or result.notes.append
    for what in remove_leftovers(q, vm_key):
        say(f"removed {what}, left by an interrupted run")
    drives = list_drives(q)
    if drive_names:
        known = {d.name: d for d in drives} | {d.node: d for d in drives}
        missing = [n for n in drive_names if n not in known]
        if missing:
            raise UsageError(f"no drive {', '.join(missing)} in the VM (it has: "
                             f"{', '.join(d.name for d in drives) or 'none'})")
        drives = [known[n] for n in drive_names]
    if not drives:
        raise UsageError("the VM has no disk to back up")
    names = {d.name: name if len(drives) == 1 else f"{name}.{d.name}" for d in drives}
    for n in names.values():
        if n in repo.manifest.archives:
            raise ArchiveExists(n)
    tag = repo.id.hex()[:16]
    run_id = uuid.uuid4().hex
    old: dict[str, str | None] = {}
    parents: dict[str, tuple[str, str]] = {}  # drive → (parent archive, why full or "")
    for d in drives:
        found = _find_parent(repo, vm_key, d) if repo.format_version >= 2 else None
        keep, why = None, "first backup of this disk"
        if found is not None:
            pmeta = found[1]["vm"]
            keep, why = pmeta.get("bitmap"), ""
            if pmeta.get("size") != d.size:
                keep, why = None, "the disk was resized"
            elif pmeta.get("filename") != d.filename:
                keep, why = None, "the disk's image file changed"
        trusted = settle_bitmaps(q, d, tag, keep)
        if found is not None and keep and not trusted:
            why = "its dirty bitmap is gone or inconsistent (VM restarted, raw disk, or " \
                  "removed by hand)"
        old[d.name] = keep if trusted else None
        if found is not None:
            parents[d.name] = (found[0], why)
        elif why:
            parents[d.name] = ("", why)
    snap = Snapshot(q, vm_key, drives, tag, old)
    snap.start(freeze)
    if freeze is not None:
        result.consistency, result.frozen = "application", getattr(freeze, "frozen", 0)
    try:
        for d in drives:
            result.drives.append(_backup_drive(repo, snap, d, names[d.name], opts, vm_key,
                                               run_id, parents.get(d.name, ("", "")),
                                               result.consistency))
            if not opts.dry_run:  # no archive: the old bitmap stays in charge
                snap.commit(d)
    finally:
        snap.close()
    return result


def _backup_drive(repo: Repository, snap: Snapshot, d: Drive, name: str,
                  base: CreateOptions, vm_key: str, run_id: str,
                  parent: tuple[str, str], consistency: str) -> DriveResult:
    pname, why = parent
    opts = CreateOptions(**{**base.__dict__})
    opts.source_id = _source_id(vm_key, d)
    mode, dirty = "full", 0
    if pname:
        opts.parent = ParentArchive.load(repo, pname)
        if snap.old.get(d.name):
            extents = snap.dirty_extents(d)
            dirty = sum(n for _, n in extents)
            opts.changed = ChangedRanges(d.size, pname, extents)
            mode, why = "incremental", ""
    src = DiskSource._open(snap.files[d.name], f"vm:{d.name}")
    try:
        plan = plan_backup(src)
        if opts.changed is not None and opts.parent is not None and not all(
                (pi := opts.parent.item_for(p.item.path, p.item.size)) is not None
                and pi.fingerprints for p in plan.items):
            # the layout changed since the parent (repartitioned): nothing to take unread
            opts.changed, mode, why = None, "full", "the disk's layout changed"
        meta = {"vm": {"id": vm_key, "drive": d.name, "node": d.node, "run": run_id,
                       "size": d.size, "format": d.format, "filename": d.filename,
                       "bitmap": snap.new[d.name], "mode": mode, "parent": pname or None,
                       "consistency": consistency}}
        res = backup_disk(repo, name, plan, opts, extra=meta)
    finally:
        src.close()
    return DriveResult(d.name, name, mode, why, d.size, dirty, res)
