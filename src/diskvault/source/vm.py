"""A running QEMU guest's disks at one point in time, with what changed since the last
backup — through QEMU's own machinery, over QMP.

Pull-mode backup, as QEMU documents it ("image fleecing"): per disk a temporary qcow2
*fleece* node backed by the disk, and ``blockdev-backup sync=none`` from the disk into
it — from then on QEMU copies every block the guest overwrites into the fleece first,
so the fleece node reads as the disk was at that instant, while the guest runs on at
full speed. One QMP ``transaction`` starts the jobs of all disks and rotates their dirty
bitmaps, so all disks and all bitmaps share one point in time. QEMU exports each fleece
node as a read-only FUSE file (guest bytes; ``SEEK_DATA``/``SEEK_HOLE`` follow the
allocation map) and over NBD with the previous dirty bitmap, whose map ``nbdinfo``
reads (NBD block status, meta context ``qemu:dirty-bitmap:NAME``).

Bitmaps: ``diskvault-<repo tag>-<time>``; the repository tag keeps two repositories'
chains apart, the time orders them. The invariant kept across runs, crashes included:
*the writes since the point in time of the newest committed archive of a disk are
recorded in the union of our bitmaps created at or after that archive's bitmap*.
``settle_bitmaps`` folds that union back into the one bitmap (``merge``), so after it
each disk has at most one of our bitmaps per repository, recording.

Everything else diskvault adds — nodes, jobs, exports, the NBD server — is named
``diskvault-…`` and removed on the way out, and by the next run if a SIGKILL came first
(``remove_leftovers``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field

from ..errors import SourceError, VmError
from .qmp import QmpClient, QmpError

PREFIX = "diskvault-"
FLEECE_DIR = "/var/tmp/diskvault-fleece"
_JOB_END_SECONDS = 120.0


@dataclass
class Drive:
    """A disk of the guest: ``name`` is how users and archives call it (the device's
    qdev id, else its node name); bitmaps live on the format node ``node``."""

    name: str
    node: str
    size: int
    format: str
    filename: str
    bitmaps: list[dict] = field(default_factory=list)

    def our_bitmaps(self, tag: str) -> list[dict]:
        """This repository's bitmaps on this disk, oldest first."""
        pre = bitmap_prefix(tag)
        return sorted((b for b in self.bitmaps if str(b.get("name", "")).startswith(pre)),
                      key=lambda b: b["name"])


def bitmap_prefix(tag: str) -> str:
    return f"{PREFIX}{tag}-"


def new_bitmap_name(tag: str) -> str:
    return f"{bitmap_prefix(tag)}{time.time_ns():020d}"


def vm_identity(q: QmpClient, qmp_path: str) -> str:
    """What identifies the VM across restarts: its UUID, else its name, else the socket."""
    with contextlib.suppress(QmpError):
        uuid = q.execute("query-uuid").get("UUID", "")
        if uuid and uuid.strip("0-"):
            return f"uuid:{uuid}"
    with contextlib.suppress(QmpError):
        name = q.execute("query-name").get("name")
        if name:
            return f"name:{name}"
    return f"qmp:{os.path.abspath(qmp_path)}"


def list_drives(q: QmpClient) -> list[Drive]:
    out = []
    for b in q.execute("query-block"):
        ins = b.get("inserted")
        if not ins or b.get("type") == "cdrom" and ins.get("ro"):
            continue
        qdev = b.get("qdev") or ""
        # "/machine/peripheral/vd0/virtio-backend" → "vd0"; anonymous devices by node name
        parts = qdev.split("/")
        name = b.get("device") or (parts[3] if qdev.startswith("/machine/peripheral/")
                                   and len(parts) > 3 else ins["node-name"])
        out.append(Drive(name, ins["node-name"], int(ins["image"]["virtual-size"]),
                         ins["drv"], ins.get("file", ""), list(ins.get("dirty-bitmaps", []))))
    return out


def refresh_bitmaps(q: QmpClient, drives: list[Drive]) -> None:
    by_node = {n["node-name"]: n for n in q.execute("query-named-block-nodes", flat=True)}
    for d in drives:
        d.bitmaps = list(by_node.get(d.node, {}).get("dirty-bitmaps", []))


def remove_leftovers(q: QmpClient, vm_key: str) -> list[str]:
    """Remove what an earlier, killed run left in QEMU; say what was removed."""
    removed = []
    for e in q.execute("query-block-exports"):
        if e["id"].startswith(PREFIX):
            with contextlib.suppress(QmpError):
                q.execute("block-export-del", id=e["id"], mode="hard")
                removed.append(f"export {e['id']}")
    if removed:
        with contextlib.suppress(QmpError):  # only ever started by us (see Snapshot)
            q.execute("nbd-server-stop")
    for j in q.execute("query-block-jobs"):
        if j["device"].startswith(PREFIX):
            with contextlib.suppress(QmpError):
                q.execute("block-job-cancel", device=j["device"], force=True)
            removed.append(f"job {j['device']}")
    _wait_jobs_gone(q)
    for n in q.execute("query-named-block-nodes", flat=True):
        if n["node-name"].startswith(PREFIX) and n["node-name"].endswith("-fleece"):
            with contextlib.suppress(QmpError):
                q.execute("blockdev-del", **{"node-name": n["node-name"]})
                removed.append(f"node {n['node-name']}")
    for n in q.execute("query-named-block-nodes", flat=True):  # the fleece files' nodes
        if n["node-name"].startswith(PREFIX):
            with contextlib.suppress(QmpError):
                q.execute("blockdev-del", **{"node-name": n["node-name"]})
                removed.append(f"node {n['node-name']}")
    d = fleece_dir(vm_key)
    unmount_below(d)
    if os.path.isdir(d):
        shutil.rmtree(d, ignore_errors=True)
    return removed


def unmount_below(d: str) -> None:
    """Lazily unmount FUSE exports left below ``d`` by a QEMU that died (their mount
    points answer ENOTCONN, so ``os.path.ismount`` cannot see them: read the table)."""
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    for p in points:
        if p.startswith(d.rstrip("/") + "/"):
            subprocess.run(["fusermount3", "-uz", p], capture_output=True, check=False)


def _wait_jobs_gone(q: QmpClient) -> None:
    """Cancelled jobs finish asynchronously; blockdev-del of their target waits for it."""
    deadline = time.monotonic() + _JOB_END_SECONDS
    while any(j["device"].startswith(PREFIX) for j in q.execute("query-block-jobs")):
        if time.monotonic() > deadline:
            raise SourceError("QEMU did not end diskvault's backup job")
        time.sleep(0.05)


def fleece_dir(vm_key: str) -> str:
    """Where the fleece exports of VM ``vm_key`` are mounted (one directory per VM)."""
    return os.path.join(FLEECE_DIR, hashlib.sha256(vm_key.encode()).hexdigest()[:16])


def nbd_dirty_extents(sock: str, export: str, context: str, what: str) -> list[tuple[int, int]]:
    """The byte ranges a dirty bitmap marks, read by ``nbdinfo`` over NBD block status
    (meta context ``context``, e.g. ``qemu:dirty-bitmap:NAME``) of ``export`` on the
    Unix socket ``sock``; ``what`` names the disk in errors."""
    uri = f"nbd+unix:///{export}?socket={sock}"
    try:
        r = subprocess.run(["nbdinfo", f"--map={context}", "--json", uri],
                           capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise SourceError("reading QEMU dirty bitmaps needs nbdinfo (Debian: "
                          "libnbd-bin)") from None
    if r.returncode:
        raise SourceError(f"nbdinfo could not read the dirty bitmap of {what}: "
                          f"{r.stderr.strip()}")
    # type bit 0 set = dirty (qemu:dirty-bitmap contexts)
    return [(e["offset"], e["length"]) for e in json.loads(r.stdout) if e["type"] & 1]


def settle_bitmaps(q: QmpClient, d: Drive, tag: str, keep: str | None) -> bool:
    """Leave ``keep`` (the bitmap of the parent archive) as this repository's only
    bitmap on ``d``, holding every write since it was created: later bitmaps of ours are
    merged into it (an interrupted run's), older ones removed. ``keep`` None or not
    usable: remove them all. True if ``keep`` holds a trustworthy change record."""
    ours = d.our_bitmaps(tag)
    names = [b["name"] for b in ours]
    trusted = keep in names and not any(b.get("inconsistent") for b in ours)
    if trusted:
        later = [n for n in names if n > keep]  # type: ignore[operator]
        if later:
            q.execute("block-dirty-bitmap-merge", node=d.node, target=keep, bitmaps=later)
        if not next(b for b in ours if b["name"] == keep).get("recording", True):
            q.execute("block-dirty-bitmap-enable", node=d.node, name=keep)
    for n in names:
        if n != keep or not trusted:
            q.execute("block-dirty-bitmap-remove", node=d.node, name=n)
    refresh_bitmaps(q, [d])
    return trusted


class Snapshot:
    """All selected disks at one point in time: fleece nodes, backup jobs, exports.

    ``old[drive name]`` is the bitmap to read changes from (or None: full read); a new
    bitmap starts recording at the point in time. ``commit(d)`` once the archive of
    ``d`` is committed; ``close`` then drops its old bitmap, and for a disk without a
    committed archive folds the new bitmap back into the old one, so no write is ever
    unaccounted for.
    """

    def __init__(self, q: QmpClient, vm_key: str, drives: list[Drive], tag: str,
                 old: dict[str, str | None]) -> None:
        self.q, self.drives, self.tag, self.old = q, drives, tag, old
        self.new: dict[str, str] = {}
        self.files: dict[str, str] = {}
        self._dir = fleece_dir(vm_key)
        self._nbd_sock = ""
        self._nodes: list[str] = []
        self._jobs: list[str] = []
        self._exports: list[str] = []
        self._committed: set[str] = set()
        self.fallbacks: dict[str, str] = {}  # QMP decides trust before start: none here

    def _node(self, d: Drive, what: str) -> str:
        return f"{PREFIX}{d.node}-{what}"

    def start(self, freeze: contextlib.AbstractContextManager | None = None) -> Snapshot:
        """``freeze``: held around the transaction alone (the guest agent's fsfreeze)."""
        os.makedirs(self._dir, mode=0o700, exist_ok=True)
        try:
            for d in self.drives:
                path = os.path.join(self._dir, f"{d.node}.qcow2")
                r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path,
                                    str(d.size)], capture_output=True, text=True)
                if r.returncode:
                    raise SourceError(f"cannot create the fleece image {path}: "
                                      f"{r.stderr.strip()}")
                self.q.execute("blockdev-add", driver="qcow2",
                               **{"node-name": self._node(d, "fleece")}, backing=d.node,
                               file={"driver": "file", "filename": path,
                                     "node-name": self._node(d, "fleecefile")})
                self._nodes += [self._node(d, "fleece"), self._node(d, "fleecefile")]
            actions, new = [], {}
            for d in self.drives:
                new[d.name] = new_bitmap_name(self.tag)
                job = self._node(d, "job")
                actions.append({"type": "block-dirty-bitmap-add", "data": {
                    "node": d.node, "name": new[d.name],
                    "persistent": d.format == "qcow2"}})
                if self.old.get(d.name):
                    actions.append({"type": "block-dirty-bitmap-disable",
                                    "data": {"node": d.node, "name": self.old[d.name]}})
                actions.append({"type": "blockdev-backup", "data": {
                    "job-id": job, "device": d.node, "target": self._node(d, "fleece"),
                    "sync": "none"}})
            with freeze if freeze is not None else contextlib.nullcontext():
                self.q.execute("transaction", actions=actions)
            self.new = new  # the bitmaps exist from here on
            self._jobs = [self._node(d, "job") for d in self.drives]
            self._export()
        except BaseException:
            self.close()
            raise
        return self

    def _export(self) -> None:
        for d in self.drives:
            f = os.path.join(self._dir, f"{d.node}.disk")
            open(f, "wb").close()
            eid = self._node(d, "fuse")
            self.q.execute("block-export-add", type="fuse", id=eid,
                           **{"node-name": self._node(d, "fleece")}, mountpoint=f,
                           writable=False)
            self._exports.append(eid)
            self.files[d.name] = f
        with_maps = [d for d in self.drives if self.old.get(d.name)]
        if with_maps:
            self._nbd_sock = os.path.join(self._dir, "nbd.sock")
            self.q.execute("nbd-server-start",
                           addr={"type": "unix", "data": {"path": self._nbd_sock}})
            for d in with_maps:
                eid = self._node(d, "nbd")
                self.q.execute("block-export-add", type="nbd", id=eid, name=d.name,
                               **{"node-name": self._node(d, "fleece")},
                               bitmaps=[self.old[d.name]])
                self._exports.append(eid)

    def dirty_extents(self, d: Drive) -> list[tuple[int, int]]:
        """The byte ranges the old bitmap marks (written since the parent's point in
        time)."""
        return nbd_dirty_extents(self._nbd_sock, d.name, f"qemu:dirty-bitmap:{self.old[d.name]}",
                                 d.name)

    def commit(self, d: Drive) -> None:
        """The archive of ``d`` is committed: its old bitmap goes at ``close`` (an
        exported bitmap cannot be removed)."""
        self._committed.add(d.name)

    def _abort(self, d: Drive) -> None:
        """No archive for ``d``: the old bitmap takes the new one's writes back."""
        new, old = self.new.get(d.name), self.old.get(d.name)
        if new is None:
            return
        if old:
            self.q.execute("block-dirty-bitmap-merge", node=d.node, target=old, bitmaps=[new])
            self.q.execute("block-dirty-bitmap-enable", node=d.node, name=old)
        self.q.execute("block-dirty-bitmap-remove", node=d.node, name=new)

    def close(self) -> None:
        """Remove exports, jobs and nodes, then rotate the bitmaps: a committed disk's
        old bitmap goes, an uncommitted disk's new one is folded back into the old.
        A QEMU that is gone leaves only our own files to clean up (never raises then:
        the error that brought us here is the one to report)."""
        try:
            self._close_in_qemu()
        except VmError:
            if self.q.alive():
                raise
        finally:
            unmount_below(self._dir)  # a dead QEMU cannot unmount its exports
            shutil.rmtree(self._dir, ignore_errors=True)
            self._exports, self._jobs, self._nodes, self.new = [], [], [], {}

    def _close_in_qemu(self) -> None:
        q = self.q
        for eid in self._exports:
            with contextlib.suppress(QmpError):
                q.execute("block-export-del", id=eid, mode="hard")
        if self._nbd_sock:
            with contextlib.suppress(QmpError):
                q.execute("nbd-server-stop")
        for job in self._jobs:
            with contextlib.suppress(QmpError):
                q.execute("block-job-cancel", device=job, force=True)
        _wait_jobs_gone(q)
        for node in self._nodes:
            with contextlib.suppress(QmpError):
                q.execute("blockdev-del", **{"node-name": node})
        for d in self.drives:
            if d.name in self._committed:
                if self.old.get(d.name):
                    q.execute("block-dirty-bitmap-remove", node=d.node, name=self.old[d.name])
            else:
                self._abort(d)


class QmpVm:
    """A VM driven over its QMP socket: the hypervisor interface of ``archive/vm.py``."""

    kind = "qmp"
    record_lost = ("its dirty bitmap is gone or inconsistent (VM restarted, raw disk, or "
                   "removed by hand)")

    def __init__(self, q: QmpClient, qmp_path: str) -> None:
        self.q, self.qmp_path = q, qmp_path

    def identity(self) -> str:
        return vm_identity(self.q, self.qmp_path)

    def remove_leftovers(self, vm_key: str) -> list[str]:
        return remove_leftovers(self.q, vm_key)

    def list_drives(self) -> list[Drive]:
        return list_drives(self.q)

    def settle(self, drives: list[Drive], tag: str, keep: dict[str, str | None],
               refs: set[str]) -> tuple[dict[str, bool], list[str]]:
        """Per drive: does ``keep[name]`` hold a trustworthy change record? (``refs``,
        the records other disks' archives name, matter only where records are shared
        between disks; QEMU bitmaps are per disk.) Nothing to report as removed:
        interrupted runs' bitmaps are merged, not dropped."""
        return {d.name: settle_bitmaps(self.q, d, tag, keep.get(d.name))
                for d in drives}, []

    def point_in_time(self, vm_key: str, drives: list[Drive], tag: str,
                      old: dict[str, str | None], refs: dict[str, str]) -> Snapshot:
        return Snapshot(self.q, vm_key, drives, tag, old)
