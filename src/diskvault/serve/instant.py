"""Instant restore: a VM runs from a backup at once while QEMU copies it to a local target.

Built on QEMU's own block layer, driven over QMP (see docs/instant-restore.md):

1. the backup is served read-only over NBD (serve/nbd.py, a private Unix socket);
2. the target is a new qcow2 image whose backing node is that export
   (``blockdev-add`` driver nbd, then qcow2 with ``backing``): guest writes land in the
   target, reads of anything not yet written come from the backup;
3. the disk is plugged into the VM (``device_add``) and the VM continues (``cont``);
4. ``block-stream`` copies every range the target does not hold yet from the backup;
   when it completes, QEMU drops the backing link: the VM now runs on the target alone,
   and the export is removed (``blockdev-del``) and stopped.

A raw target works the same way with a temporary qcow2 overlay and ``blockdev-mirror``
instead of ``block-stream``; at the end QEMU pivots the VM's disk to the target.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import TargetError, VmError
from ..source.qmp import QmpClient

SRC_NODE, TOP_NODE, RAW_NODE, JOB = "dv-backup", "dv-disk", "dv-target", "dv-restore"
DONE_EVENTS = {"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"}


@dataclass
class Plan:
    qmp_path: str
    nbd_socket: str
    export: str
    size: int
    target: str
    fmt: str  # qcow2 (block-stream) or raw (overlay + blockdev-mirror + pivot)
    device: str | None = "virtio-blk-pci"  # None: only add the block node
    device_id: str = "dv-disk0"
    speed: int = 0  # bytes/s for the copy job, 0 = unlimited
    start: bool = True  # continue a paused VM once the disk is attached


def create_target(plan: Plan) -> str | None:
    """Create the target image (and, for raw, the temporary overlay); return the overlay."""
    if os.path.exists(plan.target):
        raise TargetError(f"{plan.target} exists: instant restore creates a new image")
    overlay = None
    images = [(plan.target, plan.fmt)]
    if plan.fmt == "raw":
        overlay = plan.target + ".dv-overlay.qcow2"
        images.append((overlay, "qcow2"))
    for path, fmt in images:
        r = subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, str(plan.size)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise TargetError(f"{path}: qemu-img create failed: {r.stderr.strip()}")
    return overlay


def run(plan: Plan, stop: threading.Event, progress: Callable[[int, int], None]) -> None:
    """Attach, start and copy; returns when the VM runs on the target alone.

    Until the VM has been continued nothing is left behind on failure: the nodes are
    removed from QEMU and the new images deleted.
    """
    qmp = QmpClient(plan.qmp_path)
    try:
        overlay = create_target(plan)
        try:
            _attach(qmp, plan, overlay)
        except BaseException:
            _undo(qmp, plan, overlay)
            raise
        if plan.start and qmp.execute("query-status").get("status") in ("prelaunch", "paused"):
            qmp.execute("cont")
        if overlay is None:
            qmp.execute("block-stream", **{"job-id": JOB, "device": TOP_NODE,
                                            "speed": plan.speed})
        else:
            qmp.execute("blockdev-mirror", **{"job-id": JOB, "device": TOP_NODE,
                                               "target": RAW_NODE, "sync": "full",
                                               "speed": plan.speed})
        _wait_job(qmp, stop, progress, pivot=overlay is not None)
        if overlay is not None:
            qmp.execute("blockdev-del", **{"node-name": TOP_NODE})
            os.unlink(overlay)
        qmp.execute("blockdev-del", **{"node-name": SRC_NODE})
    finally:
        qmp.close()


def _undo(qmp: QmpClient, plan: Plan, overlay: str | None) -> None:
    """Best effort: take back the nodes _attach added (the device, added last, was not),
    delete the images create_target made."""
    for node in (RAW_NODE, TOP_NODE, SRC_NODE):
        with contextlib.suppress(VmError):
            qmp.execute("blockdev-del", **{"node-name": node})
    for path in (plan.target, overlay):
        if path:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _attach(qmp: QmpClient, plan: Plan, overlay: str | None) -> None:
    qmp.execute("blockdev-add", **{
        "driver": "nbd", "node-name": SRC_NODE, "read-only": True, "export": plan.export,
        "server": {"type": "unix", "path": plan.nbd_socket}})
    qmp.execute("blockdev-add", **{
        "driver": "qcow2", "node-name": TOP_NODE, "backing": SRC_NODE,
        "file": {"driver": "file", "filename": overlay or plan.target}})
    if overlay is not None:
        qmp.execute("blockdev-add", **{
            "driver": "raw", "node-name": RAW_NODE,
            "file": {"driver": "file", "filename": plan.target}})
    if plan.device:
        qmp.execute("device_add", driver=plan.device, drive=TOP_NODE, id=plan.device_id)


def _wait_job(qmp: QmpClient, stop: threading.Event, progress: Callable[[int, int], None],
              pivot: bool) -> None:
    """Wait for the copy job (polling its progress once a second); pivot a mirror."""
    wanted = DONE_EVENTS | ({"BLOCK_JOB_READY"} if pivot else set())
    while True:
        if stop.is_set():
            raise VmError("interrupted: the copy is incomplete and the VM still reads from "
                          "the backup")
        ev = qmp.wait_event(wanted, 1.0)
        if ev is None:
            for job in qmp.execute("query-block-jobs") or []:
                if job.get("device") == JOB:
                    progress(int(job.get("offset", 0)), int(job.get("len", 0)))
            continue
        data = ev.get("data", {})
        if data.get("device") not in (JOB, None):
            continue
        if ev["event"] == "BLOCK_JOB_READY":
            qmp.execute("job-complete", id=JOB)  # the pivot: the VM's disk is now the target
            wanted = DONE_EVENTS
            continue
        if ev["event"] == "BLOCK_JOB_CANCELLED" or data.get("error"):
            raise VmError(f"the copy failed: {data.get('error', 'cancelled')} (the VM still "
                          "reads from the backup)")
        progress(int(data.get("offset", 0)), int(data.get("len", 0)))
        return
