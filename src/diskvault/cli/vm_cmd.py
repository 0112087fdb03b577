"""diskvault vm backup (--qmp SOCKET | --libvirt DOMAIN) [--drive NAME ...] REPO::ARCHIVE

Backs up a running QEMU/KVM guest's disks at one point in time, while it runs; from the
second backup on only the blocks QEMU's dirty bitmaps mark are read (archive/vm.py;
source/vm.py over QMP, source/libvirt.py through libvirt's backup API).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator

from ..archive.vm import Hypervisor, VmBackupResult, backup_vm
from ..errors import VmError, Warning_
from ..repository.repo import Repository
from ..source.guestfreeze import AGENT_NAME, GuestFreeze, find_agent_socket
from ..source.libvirt import LibvirtFreeze, LibvirtVm, Virsh
from ..source.qmp import QmpClient
from ..source.vm import QmpVm
from . import log
from .common import WRITE, add_common, expand_placeholders, open_repo, split_location
from .options import add_archive_options, create_options, make_progress
from .output import fmt_size, stats_lines


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("vm", help="back up running QEMU/KVM virtual machines",
                            description="Virtual machine commands.")
    subparsers = parser.add_subparsers(dest="vm_command", metavar="SUBCOMMAND",
                                       parser_class=type(parser))
    subparsers.required = True
    p = subparsers.add_parser(
        "backup", help="back up a running QEMU guest's disks at one point in time",
        description="Back up the disks of a running QEMU guest through its QMP socket "
        "or through libvirt, all at one point in time, while the guest keeps running "
        "(QEMU image fleecing; libvirt's pull-mode backup). "
        "Each disk becomes a disk archive (NAME, or NAME.DRIVE when several disks are "
        "backed up). The first backup reads each disk's used blocks; later ones read only "
        "what QEMU's dirty bitmap (libvirt: checkpoint) marks and take the rest from the "
        "previous archive.")
    add_common(p)
    vm = p.add_mutually_exclusive_group(required=True)
    vm.add_argument("--qmp", metavar="SOCKET",
                    help="the VM's QMP socket (qemu -qmp unix:SOCKET,server=on,wait=off)")
    vm.add_argument("--libvirt", metavar="DOMAIN",
                    help="a running libvirt domain (name or UUID), backed up through "
                    "libvirt's backup and checkpoint API")
    p.add_argument("--connect", metavar="URI",
                   help="with --libvirt: the libvirt connection (default: libvirt's own, "
                   "$LIBVIRT_DEFAULT_URI), e.g. qemu:///system or qemu:///session")
    p.add_argument("--drive", action="append", metavar="NAME",
                   help="back up only this disk (QMP: device id or node name; libvirt: "
                   "the disk's target, vda); repeatable")
    p.add_argument("--guest-fsfreeze", action="store_true",
                   help="freeze the guest's filesystems through the QEMU guest agent for the "
                   "instant of the point in time (application-consistent)")
    p.add_argument("--qga", metavar="SOCKET",
                   help="with --qmp: the guest agent's socket (default: found through QMP)")
    add_archive_options(p)
    p.add_argument("location", metavar="REPO::ARCHIVE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    repo_loc, archive = split_location(args.location, need_archive=True)
    name = expand_placeholders(archive or "")
    progress = make_progress(args, "vm backup")
    opts = create_options(args, progress)

    if args.connect and not args.libvirt:
        raise VmError("--connect goes with --libvirt")
    if args.qga and not args.qmp:
        raise VmError("--qga goes with --qmp (libvirt finds the guest agent itself)")
    warnings = []
    with _hypervisor(args) as (hv, find_freeze), \
            open_repo(repo_loc, WRITE, args.lock_wait) as repo:
        freeze = None
        if args.guest_fsfreeze:
            freeze, why = find_freeze()
            if why:
                warnings.append(why)
                log.warning(why)
        result = backup_vm(repo, hv, name, opts, args.drive, freeze=freeze, note=log.note)
        if progress:
            progress.done(sum(d.result.stats.original for d in result.drives))
        _report(args, repo, result)
    if warnings:
        raise Warning_(warnings[0])
    return 0


FreezeFinder = Callable[[], tuple[GuestFreeze | None, str]]


@contextlib.contextmanager
def _hypervisor(args: argparse.Namespace) -> Iterator[tuple[Hypervisor, FreezeFinder]]:
    """The VM's hypervisor interface, and how to find its guest freeze."""
    if args.libvirt:
        virsh = Virsh(args.connect)
        yield LibvirtVm(virsh, args.libvirt), lambda: _checked(
            LibvirtFreeze(virsh, args.libvirt))
        return
    with QmpClient(args.qmp) as q:
        yield QmpVm(q, args.qmp), lambda: _guest_freeze(q, args.qga)


def _checked(freeze: GuestFreeze) -> tuple[GuestFreeze | None, str]:
    try:
        freeze.check()
    except VmError as e:
        return None, f"--guest-fsfreeze: {e}; the backup is crash-consistent only"
    return freeze, ""


def _guest_freeze(q: QmpClient, qga: str | None) -> tuple[GuestFreeze | None, str]:
    """The freeze to use, or None and why the backup is only crash-consistent."""
    path = qga or find_agent_socket(q)
    if path is None:
        return None, ("--guest-fsfreeze: the VM has no guest agent channel "
                      f"({AGENT_NAME}); the backup is crash-consistent only")
    return _checked(GuestFreeze(path))


def _report(args: argparse.Namespace, repo: Repository, r: VmBackupResult) -> None:
    if args.json:
        print(json.dumps({"vm": r.vm, "archives": [{
            "name": d.archive, "drive": d.drive, "mode": d.mode, "reason": d.reason,
            "consistency": r.consistency, "frozen": r.frozen,
            "size": d.size, "dirty": d.dirty, "stats": d.result.stats.to_dict()}
            for d in r.drives]}, indent=2))
        return
    for d in r.drives:
        how = (f"incremental: {fmt_size(d.dirty)} marked dirty" if d.mode == "incremental"
               else f"full read ({d.reason})" if d.reason else "full read")
        log.info(f"{d.drive} → {d.archive}: {how}; read "
                 f"{fmt_size(d.result.stats.read)} of {fmt_size(d.size)}")
        if args.stats:
            ref = repo.manifest.archives.get(d.archive)
            print("\n".join(stats_lines(d.result.meta, ref.id.hex() if ref else None)))
