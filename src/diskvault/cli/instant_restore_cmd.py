"""diskvault instant-restore --qmp SOCKET REPO::ARCHIVE TARGET [ITEM]"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import threading

from ..archive.reader import ItemReader, open_archive_readers
from ..errors import TargetError, UsageError
from ..serve import instant
from ..serve.nbd import Export, NbdServer
from . import log
from .common import READ, add_common, open_repo, parse_size, split_location, stop_on_signals
from .options import add_progress, make_progress
from .progress import Progress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("instant-restore",
                       help="run a VM from a backup at once while it is copied to TARGET")
    add_common(p)
    p.add_argument("--qmp", required=True, metavar="SOCKET",
                   help="QMP socket of the QEMU process (started with -S: paused)")
    p.add_argument("--format", choices=("qcow2", "raw"), default=None,
                   help="TARGET format (default: raw for *.raw and *.img, else qcow2)")
    p.add_argument("--device", default="virtio-blk-pci", metavar="DRIVER",
                   help="device to plug the disk in as (default virtio-blk-pci; 'none': "
                   f"only add the block node {instant.TOP_NODE!r})")
    p.add_argument("--device-id", default="dv-disk0", metavar="ID")
    p.add_argument("--speed", type=parse_size, default=0, metavar="BYTES",
                   help="limit the copy to BYTES per second (default: unlimited)")
    p.add_argument("--socket", metavar="PATH",
                   help="the NBD socket QEMU connects to (default: a private temporary one; "
                   "set it where QEMU's user can connect, e.g. under libvirt)")
    p.add_argument("--no-start", dest="start", action="store_false",
                   help="leave a paused VM paused")
    add_progress(p)
    p.add_argument("location", metavar="REPO::ARCHIVE")
    p.add_argument("target", metavar="TARGET", help="the new local image the disk is copied to")
    p.add_argument("item", nargs="?", metavar="ITEM",
                   help="the item to run (default: the whole disk, or the only item)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    repo_loc, name = split_location(args.location, need_archive=True)
    target = os.path.abspath(args.target)
    if os.path.exists(target):
        raise TargetError(f"{target} exists: instant restore creates a new image")
    if not os.path.exists(args.qmp):
        raise UsageError(f"QMP socket {args.qmp} does not exist (start QEMU with "
                         f"-qmp unix:{args.qmp},server=on,wait=off -S)")
    if not shutil.which("qemu-img"):
        raise UsageError("qemu-img is needed (Debian: qemu-utils)")
    fmt = args.format or ("raw" if target.endswith((".raw", ".img")) else "qcow2")
    with open_repo(repo_loc, READ, args.lock_wait) as repo, \
            open_archive_readers(repo, name or "") as ar:
        reader = ar.get(args.item) if args.item is not None else ar.default()
        if reader is None:
            raise UsageError(f"archive {name!r} has several items: name one "
                             f"({', '.join(ar.exports())})")
        tmpdir = None
        sock = args.socket
        if sock is None:
            tmpdir = tempfile.mkdtemp(prefix="diskvault-nbd-")
            sock = os.path.join(tmpdir, "nbd.sock")
        plan = instant.Plan(
            qmp_path=args.qmp, nbd_socket=os.path.abspath(sock), export=reader.path,
            size=reader.size, target=target, fmt=fmt,
            device=None if args.device == "none" else args.device,
            device_id=args.device_id, speed=args.speed, start=args.start)
        try:
            asyncio.run(_serve_and_copy(reader, plan, make_progress(args, "copy")))
        finally:
            if tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)
    print(f"instant-restore: {target} is complete; the VM runs on it", flush=True)
    return 0


async def _serve_and_copy(reader: ItemReader, plan: instant.Plan,
                          progress: Progress | None) -> None:
    server = NbdServer([Export(reader.path, reader)], reader.path,
                       log=lambda msg: log.info(f"instant-restore: {msg}"))
    stop = threading.Event()
    stop_on_signals(stop.set)
    try:
        await server.listen_unix(plan.nbd_socket)
        await asyncio.get_running_loop().run_in_executor(
            None, instant.run, plan, stop, progress or (lambda done, total: None))
    finally:
        if progress:
            progress.done()
        await server.close()  # removes the socket file too
        sys.stderr.flush()
