"""Real QEMU guests for tests: Debian's kernel, a busybox initramfs, QMP.

The guest is the host's own `linux-image-amd64` kernel with a small initramfs (busybox
and the virtio/ext4 modules), run under TCG: on this kind of machine /dev/kvm is nested
and a stock kernel hangs under it, while TCG boots this guest in seconds. The init
script mounts /dev/vda1 (ext4) and appends numbered records to /mnt/records, `sync`ing
after each and then announcing it on the serial console (``REC n``): a record announced
before a backup's point in time must be in that backup.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from diskvault.source.vm import fleece_dir

MiB = 1 << 20
# what the guest needs; their dependencies come from modules.dep, loaded first
MODULES = ["virtio_pci", "virtio_blk", "virtio_console", "crc32c_generic", "ext4"]
AGENT = "/usr/sbin/qemu-ga"  # Debian qemu-guest-agent; copied in with its libraries
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in {modules}; do insmod /lib/modules/$m.ko; done
n=0; while [ ! -b /dev/vda1 ] && [ $n -lt 500 ]; do sleep 0.1; n=$((n+1)); done
mount -t ext4 /dev/vda1 /mnt || {{ echo GUEST-FAILED > /dev/ttyS0; poweroff -f; }}
mkdir -p /tmp /var/run
for p in /sys/class/virtio-ports/*; do
  [ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ] && qga=/dev/${{p##*/}}
done
n=0; while [ -n "$qga" ] && [ ! -c "$qga" ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
[ -n "$qga" ] && [ -x /usr/sbin/qemu-ga ] && \\
  /usr/sbin/qemu-ga -m virtio-serial -p $qga -d -f /tmp/qga.pid -t /tmp
echo GUEST-READY > /dev/ttyS0
i=0; [ -f /mnt/records ] && i=$(wc -l < /mnt/records)
while true; do
  echo "record $i" >> /mnt/records; sync
  echo "REC $i" > /dev/ttyS0
  i=$((i+1))
done
"""


def kernel() -> str | None:
    found = sorted(glob.glob("/boot/vmlinuz-*"))
    return found[-1] if found else None


def _modules_dir(kern: str) -> str:
    return "/lib/modules/" + os.path.basename(kern).removeprefix("vmlinuz-")


def guest_missing() -> str | None:
    if not shutil.which("qemu-system-x86_64"):
        return "needs qemu-system-x86_64 (Debian: qemu-system-x86)"
    k = kernel()
    if k is None or not os.access(k, os.R_OK):
        return "needs a guest kernel in /boot (Debian: linux-image-amd64)"
    if not os.path.exists("/bin/busybox") or not shutil.which("cpio"):
        return "needs busybox-static and cpio"
    return None


needs_guest = pytest.mark.skipif(guest_missing() is not None, reason=guest_missing() or "")


def _load_order(mdir: str, wanted: list[str]) -> list[str]:
    """Module files (relative to ``mdir``), each after the modules it depends on."""
    deps: dict[str, list[str]] = {}
    with open(os.path.join(mdir, "modules.dep")) as f:
        for line in f:
            mod, _, rest = line.partition(":")
            deps[mod] = rest.split()
    by_name = {os.path.basename(m).removesuffix(".ko"): m for m in deps}
    order: list[str] = []

    def add(rel: str) -> None:
        if rel in order:
            return
        for d in reversed(deps.get(rel, [])):  # modules.dep lists the deepest last
            add(d)
        order.append(rel)

    for name in wanted:
        assert name in by_name, f"kernel module {name} not found under {mdir}"
        add(by_name[name])
    return order


def _copy_with_libraries(binary: str, root: str) -> None:
    """``binary`` and the shared libraries ``ldd`` names, at their paths under ``root``."""
    paths = [binary]
    for line in subprocess.run(["ldd", binary], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        parts = line.split()
        lib = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if lib.startswith("/"):
            paths.append(lib)
    for src in paths:
        dst = os.path.join(root, src.lstrip("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(os.path.realpath(src), dst)


def build_initramfs(dest: str) -> str:
    """The initramfs (newc cpio, gzip) with busybox, the modules and the init script."""
    k = kernel()
    assert k is not None
    root = dest + ".root"
    for d in ("bin", "proc", "sys", "dev", "mnt", "lib/modules"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    shutil.copy("/bin/busybox", os.path.join(root, "bin", "busybox"))
    mdir = _modules_dir(k)
    order = _load_order(mdir, MODULES)
    for rel in order:
        shutil.copy(os.path.join(mdir, rel), os.path.join(root, "lib", "modules"))
    if os.access(AGENT, os.X_OK):
        _copy_with_libraries(AGENT, root)
    init = os.path.join(root, "init")
    with open(init, "w") as f:
        f.write(INIT.format(modules=" ".join(os.path.basename(r)[:-3] for r in order)))
    os.chmod(init, 0o755)
    files = subprocess.run(["find", "."], cwd=root, check=True, capture_output=True).stdout
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files,
                          check=True, capture_output=True).stdout
    with open(dest, "wb") as f:
        f.write(subprocess.run(["gzip", "-1"], input=cpio, check=True,
                               capture_output=True).stdout)
    shutil.rmtree(root)
    return dest


def make_guest_disk(path: str, size_mib: int = 64, fmt: str = "qcow2") -> str:
    """A GPT disk with one ext4 partition (1 MiB .. size-1 MiB) as a ``fmt`` image."""
    raw = path + ".raw"
    with open(raw, "wb") as f:
        f.truncate(size_mib * MiB)
    subprocess.run(["sfdisk", "-q", raw], input="label: gpt\nstart=2048, type=linux\n",
                   text=True, check=True)
    part = path + ".p1"
    psize = (size_mib - 2) * MiB
    with open(part, "wb") as f:
        f.truncate(psize)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", part], check=True)
    with open(raw, "r+b") as f, open(part, "rb") as p:
        f.seek(MiB)
        shutil.copyfileobj(p, f, MiB)
    os.unlink(part)
    if fmt == "raw":
        os.rename(raw, path)
    else:
        subprocess.run(["qemu-img", "convert", "-O", fmt, raw, path], check=True)
        os.unlink(raw)
    return path


class Guest:
    """A running QEMU VM: ``qmp`` socket path, serial console log, the process."""

    def __init__(self, workdir: str, disks: dict[str, str], initrd: str | None = None,
                 paused: bool = False) -> None:
        self.dir = workdir
        self.qmp = os.path.join(workdir, "qmp.sock")
        self.qga = os.path.join(workdir, "qga.sock")
        self.console = os.path.join(workdir, "console.log")
        cmd = ["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-cpu", "max", "-m", "256",
               "-nodefaults", "-display", "none", "-no-reboot",
               "-qmp", f"unix:{self.qmp},server=on,wait=off",
               "-serial", f"file:{self.console}"]
        for i, (dev, img) in enumerate(disks.items()):
            fmt = "raw" if img.endswith(".raw") else "qcow2"
            cmd += ["-blockdev", f"driver=file,filename={img},node-name=file{i}",
                    "-blockdev", f"driver={fmt},file=file{i},node-name=disk{i}",
                    "-device", f"virtio-blk-pci,drive=disk{i},id={dev}"]
        cmd += ["-chardev", f"socket,path={self.qga},server=on,wait=off,id=qga0",
                "-device", "virtio-serial-pci",
                "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
        if initrd:
            k = kernel()
            assert k is not None
            cmd += ["-kernel", k, "-initrd", initrd,
                    "-append", "console=ttyS0 panic=-1 quiet"]
        if paused:
            cmd.append("-S")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self._wait(lambda: self._qmp_up(), 60, "QMP socket")

    def _qmp_up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"qemu exited: {self.proc.stderr.read().decode()}")
        if not os.path.exists(self.qmp):
            return False
        with contextlib.closing(socket.socket(socket.AF_UNIX)) as s:
            try:
                s.connect(self.qmp)
            except OSError:
                return False
        return True

    @staticmethod
    def _wait(cond, seconds: float, what: str) -> None:
        """Poll a condition (not a sleep standing in for an event): generous deadline."""
        deadline = time.monotonic() + seconds
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def log(self) -> str:
        try:
            with open(self.console, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def records_announced(self) -> int:
        """How many records the guest has announced as synced (REC 0 .. REC n-1)."""
        n = -1
        for line in self.log().splitlines():
            if line.startswith("REC "):
                with contextlib.suppress(ValueError):
                    n = max(n, int(line[4:]))
        return n + 1

    def wait_records(self, at_least: int, seconds: float = 300) -> int:
        self._wait(lambda: "GUEST-FAILED" not in self.log()
                   and self.records_announced() >= at_least, seconds,
                   f"{at_least} guest records")
        assert "GUEST-FAILED" not in self.log()
        return self.records_announced()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


@contextlib.contextmanager
def running_guest(workdir: str, disks: dict[str, str], initrd: str | None = None,
                  paused: bool = False) -> Iterator[Guest]:
    g = Guest(workdir, disks, initrd, paused)
    try:
        yield g
    finally:
        g.stop()


class Disk:
    """A qcow2 VM disk of random bytes (no partition table: every byte is backed up)
    and what its guest-visible bytes must be; ``written`` applies a write made
    through QEMU to ``expected`` too."""

    def __init__(self, path: str, size: int, seed: int) -> None:
        rnd = random.Random(seed)
        self.expected = bytearray()
        while len(self.expected) < size:
            self.expected += rnd.randbytes(min(16 * MiB, size - len(self.expected)))
        raw = path + ".raw"
        with open(raw, "wb") as f:
            f.write(self.expected)
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, path], check=True)
        os.unlink(raw)
        self.path = path

    def written(self, off: int, n: int, byte: int) -> None:
        self.expected[off : off + n] = bytes([byte]) * n


def fleece_mounted(vm_key: str) -> bool:
    """Whether a fleece export of diskvault's (its FUSE view of a disk) is mounted for the
    VM ``vm_key`` (as diskvault names it: ``qmp_key``, ``Domain.vm_key``). Only that VM's:
    under pytest-xdist another worker's backup may have its own export up meanwhile,
    which failed a libvirt test's "nothing left behind" check once."""
    where = fleece_dir(vm_key)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1].startswith(where) for line in f)


def qmp_key(qmp: str) -> str:
    """The key diskvault gives a test guest: it has no UUID or name (vm.vm_identity)."""
    return f"qmp:{os.path.abspath(qmp)}"


def records_in(repo: str, name: str, tmp_path, env: dict | None = None,
               frozen: bool = False) -> str:
    """The guest's record file as archive ``name`` holds it: after journal replay, or
    (``frozen``: the backup froze the guest) from a filesystem that must be clean as
    it is, with no journal to replay."""
    from support import dv

    part = str(tmp_path / f"{name}.p1")
    with open(part, "wb") as f:
        f.write(dv("extract", "--stdout", f"{repo}::{name}", "disk/part1", env=env).stdout)
    fsck = subprocess.run(["e2fsck", "-fn" if frozen else "-fy", part], capture_output=True,
                          text=True)
    # -fy exits 1 when it replayed the journal (fixed what a crash leaves)
    assert fsck.returncode in ((0,) if frozen else (0, 1)), fsck.stdout + fsck.stderr
    return subprocess.run(["debugfs", "-R", "cat /records", part], capture_output=True,
                          check=True).stdout.decode()


def check_records(text: str, at_least: int) -> int:
    """``text`` is a gap-free prefix ``record 0 .. record k-1`` (a last line cut short
    by the point in time is allowed) with k ≥ ``at_least``; returns k."""
    lines = text.split("\n")
    full = lines[:-1]  # the part after the last newline is incomplete (or empty)
    for i, line in enumerate(full):
        assert line == f"record {i}", (i, line)
    assert len(full) >= at_least, (len(full), at_least)
    return len(full)
