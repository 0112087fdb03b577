"""A libvirt-managed guest's disks at one point in time, with what changed since the
last backup — through libvirt's own backup and checkpoint API (libvirt owns the QEMU
monitor, so QMP is not ours to use). Driven by ``virsh``, libvirt's own client; its XML
is read with ElementTree, so no Python binding is needed.

Pull mode, as libvirt documents it (formatbackup, kbase "incremental backup"):
``virsh backup-begin DOMAIN BACKUP.xml CHECKPOINT.xml`` with ``<domainbackup
mode='pull'>`` makes QEMU fleece every chosen disk into a scratch qcow2 in our run
directory and serve the frozen view over NBD on a Unix socket there (export name = the
disk's target, ``vda``); a disk backed up ``backupmode='incremental'
incremental='CHECKPOINT'`` also exports the changes since that checkpoint as the meta
context ``qemu:dirty-bitmap:backup-<target>``. The same call creates the new
checkpoint — one QEMU transaction, so disks and checkpoint share one point in time.
``qemu-storage-daemon`` turns each export into a local FUSE file (``ImageExport.of_nbd``:
SEEK_DATA/SEEK_HOLE follow NBD block status) and ``nbdinfo`` reads the dirty extents.
Pull-mode jobs never finish on their own: ``virsh domjobabort`` ends them, and libvirt
removes the scratch files.

Checkpoints: ``diskvault-<repo tag>-<time>``, so two repositories keep independent
chains. libvirt gives each checkpoint a bitmap of the same name on each disk it covers,
and every such bitmap records from its checkpoint on for as long as it exists
(libvirt ≥ 6: deleting a checkpoint drops its bitmaps, merging nothing — none needs
merging). So the one invariant kept, crashes included, is: *a checkpoint named by the
newest archive of a disk is never deleted by us*; every other checkpoint of ours is
(``settle`` before the backup, ``close`` after it). An interrupted run's new
checkpoint is named by no archive and goes; the old one stays and covers everything
since, so the next incremental is complete.

Checkpoints need qcow2 disks (libvirt keeps bitmaps only there); other disks are read
whole each time. A SIGKILL of diskvault leaves the backup job running in libvirt: the
next run aborts it, if its NBD socket lies in our run directory and the process that
started it is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

from ..errors import SourceError, VmError
from ..storage.node import process_gone, process_start
from .guestfreeze import FREEZE_LIMIT, GuestFreeze, watch
from .qemu import ImageExport
from .vm import FLEECE_DIR, PREFIX, Drive, nbd_dirty_extents, unmount_below

_VIRSH_SECONDS = 300.0
_JOB_END_SECONDS = 120.0
_NO_JOB = "no domain backup job"


class LibvirtError(VmError):
    """virsh failed; the message is libvirt's own last line."""


class Virsh:
    """``virsh -c URI …`` (no URI: libvirt's default, ``$LIBVIRT_DEFAULT_URI``)."""

    def __init__(self, uri: str | None = None) -> None:
        if not shutil.which("virsh"):
            raise VmError("--libvirt needs virsh (Debian: libvirt-clients)")
        self.uri = uri

    def __call__(self, *args: str, quiet: bool = True) -> str:
        cmd = ["virsh", *(["-q"] if quiet else []), *(["-c", self.uri] if self.uri else []),
               *args]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                               timeout=_VIRSH_SECONDS)
        except subprocess.TimeoutExpired:
            raise LibvirtError(f"libvirt did not answer `virsh {args[0]}` in time") from None
        if r.returncode:
            lines = [ln.removeprefix("error: ").strip() for ln in r.stderr.splitlines()]
            lines = [ln for ln in lines if ln]
            raise LibvirtError(f"libvirt: {lines[-1] if lines else f'virsh {args[0]} failed'}")
        return r.stdout


def checkpoint_prefix(tag: str) -> str:
    return f"{PREFIX}{tag}-"


def _run_dir(vm_key: str) -> str:
    return os.path.join(FLEECE_DIR, "libvirt-" + hashlib.sha256(vm_key.encode()).hexdigest()[:16])


def _owner_alive(run_dir: str) -> int | None:
    """The pid of the diskvault process that owns ``run_dir``, if it still runs."""
    try:
        with open(os.path.join(run_dir, "owner")) as f:
            pid, start = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        return None
    return pid if pid != os.getpid() and not process_gone(pid, start) else None


class LibvirtVm:
    """A running libvirt domain: the hypervisor interface of ``archive/vm.py``."""

    kind = "libvirt"
    record_lost = "its checkpoint is gone (deleted by hand?) or no longer covers it"

    def __init__(self, virsh: Virsh, domain: str) -> None:
        self.virsh, self.domain = virsh, domain
        state = virsh("domstate", domain).strip()
        if state not in ("running", "paused"):
            raise VmError(f"domain {domain} is not running ({state}): vm backup reads "
                          "running VMs (back up a stopped VM's images with disk backup)")
        self.targets: list[str] = []  # every disk device of the domain, cdroms too

    def identity(self) -> str:
        """The domain's UUID — the same key QMP's query-uuid gives (libvirt passes it
        to QEMU), but archives also record the hypervisor interface they came from."""
        return "uuid:" + self.virsh("domuuid", self.domain).strip()

    def _xml(self, *args: str) -> ET.Element:
        try:
            return ET.fromstring(self.virsh(*args))
        except ET.ParseError:
            raise LibvirtError(f"libvirt: `virsh {args[0]}` gave unreadable XML") from None

    def list_drives(self) -> list[Drive]:
        out = []
        self.targets = []
        for disk in self._xml("dumpxml", self.domain).iterfind("devices/disk"):
            target = disk.find("target")
            if target is None or not target.get("dev"):
                continue
            name = target.get("dev", "")
            self.targets.append(name)
            src = disk.find("source")
            if disk.get("device", "disk") != "disk" or src is None:
                continue  # cdroms, floppies, empty drives
            if disk.get("type") not in ("file", "block"):
                continue  # network disks: libvirt's pull backup still works, but
                # their identity is not a file name; leave them to a later version
            drv = disk.find("driver")
            size = 0
            for line in self.virsh("domblkinfo", self.domain, name).splitlines():
                if line.startswith("Capacity:"):
                    size = int(line.split()[1])
            out.append(Drive(name, name, size, drv.get("type", "raw") if drv is not None
                             else "raw", src.get("file") or src.get("dev") or ""))
        return out

    def checkpoints(self) -> list[str]:
        return [ln.strip() for ln in self.virsh("checkpoint-list", self.domain, "--name")
                .splitlines() if ln.strip()]

    def checkpoint_disks(self, name: str) -> set[str]:
        """The disks checkpoint ``name`` keeps a bitmap on."""
        x = self._xml("checkpoint-dumpxml", self.domain, name, "--no-domain")
        return {d.get("name", "") for d in x.iterfind("disks/disk")
                if d.get("checkpoint") == "bitmap"}

    def delete_checkpoint(self, name: str) -> None:
        """Delete a checkpoint and its bitmaps; one whose bitmap is already gone (removed
        by hand, disk detached) loses its metadata alone."""
        try:
            self.virsh("checkpoint-delete", self.domain, name)
        except LibvirtError:
            if name not in self.checkpoints():
                return
            self.virsh("checkpoint-delete", self.domain, name, "--metadata")

    def backup_socket(self) -> str | None:
        """The NBD socket of the domain's running backup job; None if there is none."""
        try:
            x = self._xml("backup-dumpxml", self.domain)
        except LibvirtError as e:
            if _NO_JOB in str(e):
                return None
            raise
        server = x.find("server")
        return server.get("socket", "") if server is not None else ""

    def end_job(self, run_dir: str) -> None:
        """Abort the domain's backup job if it is ours (its NBD socket lies in
        ``run_dir``) — pull-mode jobs end that way — and wait until libvirt has torn
        it down (its block jobs end asynchronously)."""
        sock = self.backup_socket()
        if sock is None or not sock.startswith(run_dir + "/"):
            return
        with contextlib.suppress(LibvirtError):  # it may have ended by itself
            self.virsh("domjobabort", self.domain)
        deadline = time.monotonic() + _JOB_END_SECONDS
        while self.backup_socket() is not None:
            if time.monotonic() > deadline:
                raise SourceError(f"libvirt did not end the backup job of {self.domain}")
            time.sleep(0.05)

    def remove_leftovers(self, vm_key: str) -> list[str]:
        """End a backup job a killed diskvault left on the domain and remove its files.
        Someone else's job, or a diskvault still running, is an error, not a leftover."""
        d = _run_dir(vm_key)
        removed = []
        sock = self.backup_socket()
        if sock is not None:
            if not sock.startswith(FLEECE_DIR + "/"):
                raise VmError(f"domain {self.domain} runs a backup job that is not "
                              "diskvault's: wait for it to end (virsh domjobinfo)")
            pid = _owner_alive(os.path.dirname(sock))
            if pid is not None:
                raise VmError(f"another diskvault (pid {pid}) is backing up domain "
                              f"{self.domain}")
            self.end_job(os.path.dirname(sock))
            removed.append("backup job")
        elif (pid := _owner_alive(d)) is not None:
            raise VmError(f"another diskvault (pid {pid}) is backing up domain {self.domain}")
        unmount_below(d)
        if os.path.isdir(d):
            shutil.rmtree(d, ignore_errors=True)
        return removed

    def settle(self, drives: list[Drive], tag: str, keep: dict[str, str | None],
               refs: set[str]) -> tuple[dict[str, bool], list[str]]:
        """Delete this repository's checkpoints that no archive names (``refs``: those
        the newest archives of the VM's disks name); then per drive, does ``keep``
        still cover it? (libvirt itself checks the bitmap at backup-begin.)"""
        removed = []
        ours = [c for c in self.checkpoints() if c.startswith(checkpoint_prefix(tag))]
        for c in ours:
            if c not in refs:
                self.delete_checkpoint(c)
                removed.append(f"checkpoint {c}")
        trusted = {}
        covers: dict[str, set[str]] = {}
        for dr in drives:
            k = keep.get(dr.name)
            if k and k in ours and k not in covers:  # k: named by an archive (refs)
                covers[k] = self.checkpoint_disks(k)
            trusted[dr.name] = bool(k and dr.name in covers.get(k, ()))
        return trusted, removed

    def point_in_time(self, vm_key: str, drives: list[Drive], tag: str,
                      old: dict[str, str | None], refs: dict[str, str]) -> LibvirtBackup:
        return LibvirtBackup(self, vm_key, drives, tag, old, refs)

    def alive(self) -> bool:
        """Is the domain still there and running? (False also if libvirt is gone.)"""
        try:
            return self.virsh("domstate", self.domain).strip() in ("running", "paused")
        except VmError:
            return False

    def qemu_owner(self) -> tuple[int, int] | None:
        """The uid and gid the domain's QEMU runs as (found by the ``-uuid`` libvirt
        gives it): QEMU creates the NBD socket and libvirt the scratch files in our run
        directory as that user — ``libvirt-qemu`` under qemu:///system, the session's
        user under qemu:///session."""
        uuid = self.identity().removeprefix("uuid:").encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
                if not any(a == b"-uuid" and b == uuid
                           for a, b in zip(args, args[1:], strict=False)):
                    continue
                with open(f"/proc/{pid}/status") as f:
                    ids = {k: v.split() for k, _, v in (ln.partition(":") for ln in f)}
                return int(ids["Uid"][1]), int(ids["Gid"][1])
            except (OSError, KeyError, IndexError, ValueError):
                continue
        return None


_BROKEN = re.compile(r"missing or broken bitmap '[^']*' for disk '([^']*)'")


class LibvirtBackup:
    """All chosen disks at one point in time through one libvirt pull-mode backup job.

    ``old[drive]``: the checkpoint to read changes from (None: full read); ``new``: the
    checkpoint created at the point in time (qcow2 disks). ``refs[drive]`` is the
    checkpoint the newest archive of each disk of the VM names; ``commit(d)`` moves
    ``d``'s to the new one, and ``close`` deletes every checkpoint of ours left unnamed.
    """

    def __init__(self, vm: LibvirtVm, vm_key: str, drives: list[Drive], tag: str,
                 old: dict[str, str | None], refs: dict[str, str]) -> None:
        self.vm, self.drives, self.tag, self.old, self.refs = vm, drives, tag, old, refs
        self.new: dict[str, str] = {}
        self.files: dict[str, str] = {}
        self.fallbacks: dict[str, str] = {}  # drive → why its incremental was refused
        self._dir = _run_dir(vm_key)
        self._sock = os.path.join(self._dir, "nbd.sock")
        self._exports: dict[str, tuple[str, str]] = {}  # drive → (export, bitmap)
        self._images: list[ImageExport] = []
        self._begun = False

    def _backup_xml(self) -> str:
        root = ET.Element("domainbackup", mode="pull")
        ET.SubElement(root, "server", transport="unix", socket=self._sock)
        disks = ET.SubElement(root, "disks")
        for d in self.drives:
            e = ET.SubElement(disks, "disk", name=d.name, backup="yes", type="file")
            if self.old.get(d.name):
                e.set("backupmode", "incremental")
                e.set("incremental", self.old[d.name] or "")
            else:
                e.set("backupmode", "full")
            ET.SubElement(e, "scratch", file=os.path.join(self._dir, f"{d.name}.scratch"))
        return ET.tostring(root, encoding="unicode")

    def _checkpoint_xml(self, name: str) -> str | None:
        chosen = {d.name for d in self.drives if d.format == "qcow2"}
        if not chosen:
            return None
        root = ET.Element("domaincheckpoint")
        ET.SubElement(root, "name").text = name
        ET.SubElement(root, "description").text = "diskvault vm backup"
        disks = ET.SubElement(root, "disks")
        for t in self.vm.targets:
            ET.SubElement(disks, "disk", name=t,
                          checkpoint="bitmap" if t in chosen else "no")
        return ET.tostring(root, encoding="unicode")

    def _write(self, name: str, text: str) -> str:
        path = os.path.join(self._dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def start(self, freeze: contextlib.AbstractContextManager | None = None) -> LibvirtBackup:
        """``freeze``: held around ``backup-begin`` alone (the guest agent's fsfreeze)."""
        os.makedirs(self._dir, mode=0o700, exist_ok=True)
        try:
            with open(os.path.join(self._dir, "owner"), "w") as f:
                f.write(f"{os.getpid()} {process_start(os.getpid())}\n")
            owner = self.vm.qemu_owner()
            if owner is not None and owner[0] != os.geteuid() and os.geteuid() == 0:
                os.chown(self._dir, *owner)  # 0700 still: only QEMU's user and root
            name = f"{checkpoint_prefix(self.tag)}{time.time_ns():020d}"
            self._begin(name, freeze)
            self.new = {d.name: name for d in self.drives if d.format == "qcow2"}
            self._export()
        except BaseException:
            self.close()
            raise
        return self

    def _begin(self, name: str, freeze: contextlib.AbstractContextManager | None) -> None:
        """backup-begin; a disk whose checkpoint bitmap libvirt finds missing or broken
        (QEMU crashed with it, removed by hand) is retried as a full read."""
        while True:
            args = [self._write("backup.xml", self._backup_xml())]
            cxml = self._checkpoint_xml(name)
            if cxml is not None:
                args.append(self._write("checkpoint.xml", cxml))
            try:
                self._begun = True  # from here a job may exist: close ends it
                with freeze if freeze is not None else contextlib.nullcontext():
                    self.vm.virsh("backup-begin", self.vm.domain, *args)
                return
            except LibvirtError as e:
                m = _BROKEN.search(str(e))
                if not m or not self.old.get(m[1]):
                    raise
                self.old[m[1]] = None
                self.fallbacks[m[1]] = ("its checkpoint's bitmap is missing or broken "
                                        "(removed by hand, or QEMU stopped without saving it)")

    def _export(self) -> None:
        x = self.vm._xml("backup-dumpxml", self.vm.domain)
        server = x.find("server")
        self._sock = server.get("socket", self._sock) if server is not None else self._sock
        for e in x.iterfind("disks/disk"):
            if e.get("backup") == "yes":
                name = e.get("name", "")
                self._exports[name] = (e.get("exportname") or name,
                                       e.get("exportbitmap") or f"backup-{name}")
        for d in self.drives:
            exp = ImageExport.of_nbd(self._sock, self._exports[d.name][0], where=self._dir)
            self._images.append(exp)
            exp.start()
            self.files[d.name] = exp.path

    def dirty_extents(self, d: Drive) -> list[tuple[int, int]]:
        """The byte ranges written since the checkpoint ``old[d]`` (NBD block status)."""
        export, bitmap = self._exports[d.name]
        return nbd_dirty_extents(self._sock, export, f"qemu:dirty-bitmap:{bitmap}", d.name)

    def commit(self, d: Drive) -> None:
        """The archive of ``d`` is committed: it names the new checkpoint now."""
        if d.name in self.new:
            self.refs[d.name] = self.new[d.name]
        else:
            self.refs.pop(d.name, None)

    def close(self) -> None:
        """Stop our exports, end the job, delete every checkpoint of ours that no
        archive names (the old one of a committed disk; the new one if nothing was
        committed). A domain that is gone leaves only our files to clean (never raises
        then: the error that brought us here is the one to report)."""
        try:
            for exp in self._images:
                exp.close()
            if self._begun:
                self.vm.end_job(self._dir)
                keep = set(self.refs.values())
                for c in self.vm.checkpoints():
                    if c.startswith(checkpoint_prefix(self.tag)) and c not in keep:
                        self.vm.delete_checkpoint(c)
        except VmError:
            if self.vm.alive():
                raise
        finally:
            unmount_below(self._dir)
            shutil.rmtree(self._dir, ignore_errors=True)
            self._images, self._begun = [], False


class LibvirtFreeze(GuestFreeze):
    """``virsh domfsfreeze``/``domfsthaw`` (libvirt talks to the guest agent), with the
    same watchdog process as the QMP path: a SIGKILLed diskvault still thaws."""

    def __init__(self, virsh: Virsh, domain: str, limit: float = FREEZE_LIMIT) -> None:
        super().__init__(domain, limit)
        self.virsh, self.domain = virsh, domain

    def check(self) -> None:
        try:
            self.virsh("domfsinfo", self.domain)
        except LibvirtError as e:
            raise VmError(f"guest agent: {e}") from None

    def _freeze(self) -> int:
        out = self.virsh("domfsfreeze", self.domain, quiet=False)  # -q hides the count
        m = re.search(r"(\d+)", out)
        return int(m[1]) if m else 0

    def _thaw(self) -> None:
        self.virsh("domfsthaw", self.domain)

    def _watchdog_cmd(self) -> list[str]:
        return [sys.executable, "-m", "diskvault.source.libvirt", self.virsh.uri or "",
                self.domain, str(self.limit)]


if __name__ == "__main__":  # the thaw watchdog of LibvirtFreeze: URI DOMAIN SECONDS
    sys.exit(watch(lambda: Virsh(sys.argv[1] or None)("domfsthaw", sys.argv[2]),
                   float(sys.argv[3])))
