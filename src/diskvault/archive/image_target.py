"""Restoring a disk archive into a VM image file (qcow2, vmdk, vhdx, vdi).

The image is written as the guest will see it: QEMU exports the image's guest disk as
a writable FUSE file (``source.qemu.ImageExport``) and the ordinary disk restore writes
onto that file. Zero and unused ranges are never allocated: a new image starts
unallocated (reads as zeros) and the export turns zero writes into discards, so the
result is as sparse as the backup.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from ..repository.repo import Repository
from ..source.qemu import ImageExport, create_image, target_format
from .disk_restore import DiskArchive, RestorePlan, plan_restore


@contextlib.contextmanager
def restore_target(repo: Repository, arch: DiskArchive, target: str, partition: int | None,
                   force: bool, fmt: str | None = None, dry_run: bool = False
                   ) -> Iterator[RestorePlan]:
    """The restore plan for ``target``; for a VM image, a plan onto its guest disk,
    valid while the context is open. A new image is created only when not ``dry_run``
    and is removed again if the restore fails."""
    exists = os.path.exists(target)
    fmt = target_format(target, fmt)  # the option, else the file name's extension
    if fmt is None:
        yield plan_restore(repo, arch, target, partition, force)
        return
    if not exists:
        plan = plan_restore(repo, arch, target, partition, force)  # refuses before writing
        if dry_run:
            yield plan
            return
        create_image(target, fmt, plan.final_size)
    ok = False
    try:
        with ImageExport(target, fmt, writable=True) as exp:
            yield plan_restore(repo, arch, exp.path, partition, force)
        ok = True
    finally:
        if not exists and not ok:
            with contextlib.suppress(OSError):
                os.unlink(target)
