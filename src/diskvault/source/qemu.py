"""VM image files (qcow2, vmdk, vhdx, ...) seen as the guest sees its disk, through QEMU.

A qcow2 file's own bytes shuffle from day to day (clusters are allocated in write
order, compressed clusters and backing chains hide the guest's data), so a backup of
the container deduplicates badly and cannot apply block maps. The guest's view is what
``disk backup`` wants. We read it with QEMU's own machinery rather than a parser of our
own: ``qemu-storage-daemon`` exports the image's format node as a FUSE file, on which
``pread`` returns guest bytes and ``SEEK_DATA``/``SEEK_HOLE`` follow the image's
allocation map (unallocated and zero clusters are holes). So every reader that works on
a raw image or a block device — partition tables, block maps, the hole-skipping content
reader — works unchanged on the export; backing chains and compressed clusters are
resolved by QEMU.

The daemon runs as our child with ``PR_SET_PDEATHSIG``: if diskvault dies (even by
SIGKILL) the kernel sends it SIGTERM, and it removes its FUSE mount on the way out.

Format probing: ``qemu-img info`` guesses the format from the file's first bytes, like
QEMU does. A raw disk of an untrusted guest may hold a forged qcow2 header naming a
backing file on the host; ``image_format`` therefore never follows what a *raw*-named
file claims unless the caller passes the format (``--image-format``), and an image
whose backing file cannot be found is refused by QEMU.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import SourceError, TargetError

# formats read through QEMU; "raw" files are read directly, as before
VM_FORMATS = ("qcow2", "qcow", "vmdk", "vhdx", "vpc", "vdi", "qed", "parallels")
# file name endings users give raw images; a probe claiming another format there is
# ignored (a guest can write any header into its raw disk)
RAW_SUFFIXES = (".raw", ".img", ".iso", ".bin", ".dd")
_PR_SET_PDEATHSIG = 1
_READY_SECONDS = 60.0


def have_qemu() -> bool:
    return bool(shutil.which("qemu-img") and shutil.which("qemu-storage-daemon"))


@dataclass(frozen=True)
class ImageInfo:
    path: str
    format: str  # "raw" or one of VM_FORMATS
    virtual_size: int
    backing: str | None = None


def image_info(path: str, fmt: str | None = None) -> ImageInfo:
    """The image's format and guest size, from ``qemu-img info`` (``-U``: the image may
    be in use by a running VM; we only read)."""
    cmd = ["qemu-img", "info", "--output=json", "-U"]
    if fmt:
        cmd += ["-f", fmt]
    try:
        r = subprocess.run(cmd + [path], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SourceError("reading VM images needs qemu-img (Debian: qemu-utils)") from None
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise SourceError(f"{path}: qemu-img cannot read it: {msg.removeprefix('qemu-img: ')}")
    d = json.loads(r.stdout)
    return ImageInfo(path, d["format"], int(d["virtual-size"]),
                     d.get("full-backing-filename") or d.get("backing-filename"))


def guest_format(path: str, fmt: str | None = None) -> str | None:
    """The VM image format to read ``path`` through, or None to read its bytes as they
    are (raw images, devices, or no QEMU tools and nothing asked of them)."""
    if fmt is not None:
        if fmt != "raw" and fmt not in VM_FORMATS:
            raise SourceError(f"unknown image format {fmt!r}: use raw or one of "
                              f"{', '.join(VM_FORMATS)}")
        return None if fmt == "raw" else fmt
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return None  # the caller's open reports it
    if not regular or path.lower().endswith(RAW_SUFFIXES) or not shutil.which("qemu-img"):
        return None
    info = image_info(path)
    return info.format if info.format in VM_FORMATS else None


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class ImageExport:
    """A VM image exported by ``qemu-storage-daemon`` as a FUSE file of guest bytes.

    ``path`` is the guest disk as a regular file (read-only unless ``writable``).
    """

    def __init__(self, image: str, fmt: str, writable: bool = False,
                 where: str | None = None) -> None:
        if not have_qemu():
            err = TargetError if writable else SourceError
            raise err(f"{image}: {fmt} images need qemu-img and qemu-storage-daemon "
                      "(Debian: qemu-utils, qemu-system-common)")
        self.image, self.format, self.writable = image, fmt, writable
        self._dir = tempfile.mkdtemp(prefix="diskvault-qemu-", dir=where)
        self.path = os.path.join(self._dir, "disk")
        open(self.path, "wb").close()  # a FUSE export mounts over a regular file
        self._proc: subprocess.Popen[bytes] | None = None
        self._nbd: tuple[str, str] | None = None

    @classmethod
    def of_nbd(cls, sock: str, export: str, where: str | None = None) -> ImageExport:
        """A read-only NBD export (Unix socket ``sock``, export name ``export``) as a
        FUSE file: ``SEEK_DATA``/``SEEK_HOLE`` follow the server's block status
        (``base:allocation``). ``where``: the directory to mount in."""
        exp = cls(f"nbd+unix:///{export}?socket={sock}", "nbd", where=where)
        exp._nbd = (sock, export)
        return exp

    def _blockdevs(self) -> list[str]:
        if self._nbd is not None:
            sock, export = self._nbd
            return ["--blockdev", f"driver=nbd,node-name=dv-disk,server.type=unix,"
                    f"server.path={_escape(sock)},export={_escape(export)},read-only=on"]
        file_opts = f"driver=file,filename={_escape(os.path.abspath(self.image))}," \
                    f"node-name=dv-file,read-only={'off' if self.writable else 'on'}"
        if self.writable:  # zero writes leave clusters unallocated: a sparse image
            file_opts += ",discard=unmap"
        fmt_opts = f"driver={self.format},file=dv-file,node-name=dv-disk," \
                   f"read-only={'off' if self.writable else 'on'}"
        if self.writable:
            fmt_opts += ",discard=unmap,detect-zeroes=unmap"
        else:
            # a running VM may hold the image's write lock; we read a crash-consistent
            # view at best — live guests belong to `vm backup`
            fmt_opts += ",force-share=on"
            file_opts += ",locking=off"
        return ["--blockdev", file_opts, "--blockdev", fmt_opts]

    def start(self) -> ImageExport:
        cmd = ["qemu-storage-daemon", *self._blockdevs(),
               "--export", f"type=fuse,id=dv-export,node-name=dv-disk,mountpoint={self.path},"
               f"writable={'on' if self.writable else 'off'}"]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, preexec_fn=_set_pdeathsig)
        # the daemon mounts before it serves; wait for the mount (or its death)
        deadline = time.monotonic() + _READY_SECONDS
        while not os.path.ismount(self.path):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                err = self._stderr()
                self.close()
                what = TargetError if self.writable else SourceError
                raise what(f"{self.image}: qemu-storage-daemon could not export it: {err}")
            time.sleep(0.02)
        return self

    def _stderr(self) -> str:
        assert self._proc is not None
        if self._proc.poll() is None:
            self._proc.kill()
        _, err = self._proc.communicate()
        lines = err.decode(errors="replace").strip().splitlines()
        return lines[-1].removeprefix("qemu-storage-daemon: ") if lines else "no message"

    def close(self) -> None:
        """Stop the daemon (it flushes and unmounts) and remove the mount point."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc is not None and self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None
        if os.path.ismount(self.path):  # a daemon that died without unmounting
            subprocess.run(["fusermount3", "-uz", self.path], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)

    def __enter__(self) -> ImageExport:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _escape(path: str) -> str:
    """QEMU option values: a comma is written twice."""
    return path.replace(",", ",,")


@contextlib.contextmanager
def guest_view(path: str, fmt: str | None = None) -> Iterator[tuple[str, str | None]]:
    """``(path to read, image format or None)``: the guest disk of a VM image through
    an export, or ``path`` itself for raw images and devices."""
    gfmt = guest_format(path, fmt)
    if gfmt is None:
        yield path, None
        return
    with ImageExport(path, gfmt) as exp:
        yield exp.path, gfmt


def create_image(path: str, fmt: str, size: int) -> None:
    """A new, empty (all unallocated) image of ``size`` guest bytes."""
    try:
        r = subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, str(size)],
                           capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise TargetError(f"writing {fmt} images needs qemu-img (Debian: qemu-utils)") from None
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise TargetError(f"{path}: qemu-img create failed: {msg.removeprefix('qemu-img: ')}")


def target_format(path: str, fmt: str | None) -> str | None:
    """The format a restore target is written in: ``fmt`` if given, else its
    extension (``.qcow2``, ``.vmdk``, ``.vhdx``, ``.vdi``); None means raw."""
    if fmt is None:
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        fmt = ext if ext in ("qcow2", "vmdk", "vhdx", "vdi") else "raw"
    if fmt != "raw" and fmt not in VM_FORMATS:
        raise TargetError(f"unknown image format {fmt!r}: use raw, qcow2, vmdk, vhdx or vdi")
    return None if fmt == "raw" else fmt
