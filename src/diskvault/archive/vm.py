"""``vm backup``: each disk of a running QEMU guest into a disk archive, all disks at
one point in time, reading only what the change records (dirty bitmaps) mark.

The VM is reached through a ``Hypervisor``: QEMU's QMP socket, or libvirt, which owns
the monitor of the VMs it runs and has its own backup and checkpoint API. Both give the
same thing: the disks frozen at one instant as files, a change record started at that
instant, and the extents written since an older record.

One archive per disk: a VM with one disk (or one chosen with ``--drive``) gets the name
given; with several, each archive is ``NAME.<drive>``. Every archive of a run records
``vm`` metadata (the VM's identity, the disk, the run's id and point in time, the
change record that now tracks changes since it, the hypervisor interface), and is an
ordinary disk archive: ``disk restore``, ``extract --stdout``, mount and NBD work on it
unchanged.

The parent of a disk's archive is the newest archive of the same VM disk in this
repository. Its change record, if the hypervisor still has it and it can be trusted
(present, not inconsistent, same hypervisor interface, disk size and image file
unchanged), gives the changed extents: the rest is taken from the parent unread
(``ChangedRanges``). Otherwise the disk is read whole — still compared block by block
with the parent, so only changed blocks are stored — and the reason is reported. Never a
wrong archive: a record is only ever trusted for the archive that recorded its name.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import ArchiveExists, IntegrityError, ObjectMissing, UsageError
from ..repository.repo import Repository
from ..source.vm import Drive
from .create import CreateOptions
from .disk import DiskBackupResult, DiskSource, backup_disk, plan_backup
from .parent import ChangedRanges, ParentArchive


class PointInTime(Protocol):
    """The chosen disks frozen at one instant, readable as files (``files[drive]``),
    with the change records to read from (``old``) and the ones started at the
    instant (``new``); ``fallbacks[drive]``: why an ``old`` record was refused at
    the start (it is None then)."""

    old: dict[str, str | None]
    new: dict[str, str]
    files: dict[str, str]
    fallbacks: dict[str, str]

    def start(self, freeze: contextlib.AbstractContextManager | None = None) -> object: ...
    def dirty_extents(self, d: Drive) -> list[tuple[int, int]]: ...
    def commit(self, d: Drive) -> None: ...
    def close(self) -> None: ...


class Hypervisor(Protocol):
    """What ``backup_vm`` needs of the thing that runs the VM: QEMU over QMP
    (``source/vm.py``'s ``QmpVm``) or libvirt (``source/libvirt.py``'s ``LibvirtVm``).
    A change record (QEMU bitmap, libvirt checkpoint) is named in each archive's
    ``vm.bitmap`` and trusted only for that archive."""

    kind: str
    record_lost: str  # why a disk's change record cannot be trusted: the full read's reason

    def identity(self) -> str: ...
    def remove_leftovers(self, vm_key: str) -> list[str]: ...
    def list_drives(self) -> list[Drive]: ...
    def settle(self, drives: list[Drive], tag: str, keep: dict[str, str | None],
               refs: set[str]) -> tuple[dict[str, bool], list[str]]: ...
    def point_in_time(self, vm_key: str, drives: list[Drive], tag: str,
                      old: dict[str, str | None], refs: dict[str, str]) -> PointInTime: ...


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


def _newest(repo: Repository, vm_key: str, drives: list[Drive]) -> dict[str, tuple[str, dict]]:
    """The newest archive of each of these VM disks: drive → (name, its metadata)."""
    want = {d.name: _source_id(vm_key, d) for d in drives}
    found: dict[str, tuple[str, dict]] = {}
    if repo.format_version < 2:
        return found
    for ref in reversed(repo.manifest.sorted_archives()):
        if len(found) == len(want):
            break
        try:
            meta = repo.load_archive(ref)
        except (IntegrityError, ObjectMissing):
            continue
        sid = meta.get("source_id")
        for name, w in want.items():
            if name not in found and sid == w and isinstance(meta.get("vm"), dict):
                found[name] = (ref.name, meta)
    return found


def _choose(drives: list[Drive], drive_names: list[str] | None) -> list[Drive]:
    if drive_names:
        known = {d.name: d for d in drives} | {d.node: d for d in drives}
        missing = [n for n in drive_names if n not in known]
        if missing:
            raise UsageError(f"no drive {', '.join(missing)} in the VM (it has: "
                             f"{', '.join(d.name for d in drives) or 'none'})")
        drives = [known[n] for n in drive_names]
    if not drives:
        raise UsageError("the VM has no disk to back up")
    return drives


def backup_vm(repo: Repository, hv: Hypervisor, name: str, opts: CreateOptions,
              drive_names: list[str] | None = None,
              freeze: contextlib.AbstractContextManager | None = None,
              note: Callable[[str], None] | None = None) -> VmBackupResult:
    vm_key = hv.identity()
    result = VmBackupResult(vm_key)
    say = note or result.notes.append
    for what in hv.remove_leftovers(vm_key):
        say(f"removed {what}, left by an interrupted run")
    all_drives = hv.list_drives()
    drives = _choose(all_drives, drive_names)
    names = {d.name: name if len(drives) == 1 else f"{name}.{d.name}" for d in drives}
    for n in names.values():
        if n in repo.manifest.archives:
            raise ArchiveExists(n)
    tag = repo.id.hex()[:16]
    run_id = uuid.uuid4().hex
    newest = _newest(repo, vm_key, all_drives)
    # the change record each disk's newest archive names (this hypervisor's kind only)
    refs = {k: m["vm"]["bitmap"] for k, (_, m) in newest.items()
            if m["vm"].get("hypervisor", "qmp") == hv.kind and m["vm"].get("bitmap")}
    keep: dict[str, str | None] = {}
    why: dict[str, str] = {}
    for d in drives:
        keep[d.name], why[d.name] = None, "first backup of this disk"
        if d.name not in newest:
            continue
        pmeta = newest[d.name][1]["vm"]
        keep[d.name], why[d.name] = refs.get(d.name), ""
        if pmeta.get("hypervisor", "qmp") != hv.kind:
            keep[d.name], why[d.name] = None, (f"the previous backup went through "
                                               f"{pmeta.get('hypervisor', 'qmp')}")
        elif pmeta.get("size") != d.size:
            keep[d.name], why[d.name] = None, "the disk was resized"
        elif pmeta.get("filename") != d.filename:
            keep[d.name], why[d.name] = None, "the disk's image file changed"
        elif not keep[d.name]:
            why[d.name] = "the previous backup left no change record (not a qcow2 disk?)"
    trusted, removed = hv.settle(drives, tag, keep, set(refs.values()))
    for what in removed:
        say(f"removed {what}, named by no archive (an interrupted run's)")
    old: dict[str, str | None] = {}
    for d in drives:
        if keep[d.name] and not trusted[d.name]:
            why[d.name] = hv.record_lost
        old[d.name] = keep[d.name] if trusted[d.name] else None
    snap = hv.point_in_time(vm_key, drives, tag, old, dict(refs))
    snap.start(freeze)
    why.update(snap.fallbacks)
    if freeze is not None:
        result.consistency, result.frozen = "application", getattr(freeze, "frozen", 0)
    try:
        for d in drives:
            parent = (newest[d.name][0] if d.name in newest else "", why[d.name])
            result.drives.append(_backup_drive(repo, snap, d, names[d.name], opts, vm_key,
                                               run_id, parent, result.consistency, hv.kind))
            if not opts.dry_run:  # no archive: the old record stays in charge
                snap.commit(d)
    finally:
        snap.close()
    return result


def _backup_drive(repo: Repository, snap: PointInTime, d: Drive, name: str,
                  base: CreateOptions, vm_key: str, run_id: str,
                  parent: tuple[str, str], consistency: str, kind: str) -> DriveResult:
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
                       "bitmap": snap.new.get(d.name), "mode": mode, "parent": pname or None,
                       "consistency": consistency, "hypervisor": kind}}
        res = backup_disk(repo, name, plan, opts, extra=meta)
    finally:
        src.close()
    return DriveResult(d.name, name, mode, why, d.size, dirty, res)
