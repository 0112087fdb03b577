"""A tiny real guest for boot tests: Debian's kernel, a busybox initramfs, an ext4 disk.

The initramfs loads the virtio and ext4 modules, mounts ``/dev/vda`` and runs ``run.sh``
from it, so the guest's userland comes from the disk under test. ``run.sh``:

- first boot (no ``/log`` on the disk): prints ``DV-BOOT-OK``, then writes a 64 KiB
  random file ``/log/N`` each second, syncs, and prints ``DV-TICK N <md5>``;
- later boots: prints ``DV-SUM N <md5>`` for every file in ``/log``, then ``DV-DONE``
  and powers off.

Everything is printed on the serial console (``-serial file:LOG``).
"""

from __future__ import annotations

import glob
import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path

MODULES = ["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"]

INIT = """#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
{insmods}
i=0
while [ ! -b /dev/vda ] && [ $i -lt 3000 ]; do sleep 0.1; i=$((i+1)); done
mkdir -p /mnt
if mount -t ext4 /dev/vda /mnt; then
    exec /bin/sh /mnt/run.sh
fi
echo DV-NO-DISK
dmesg | tail -30
poweroff -f
"""

RUN = """echo DV-BOOT-OK
if [ -d /mnt/log ]; then
    for f in $(ls /mnt/log | sort -n); do
        echo "DV-SUM $f $(md5sum < /mnt/log/$f | cut -c1-32)"
    done
    echo DV-DONE
    umount /mnt
    poweroff -f
fi
mkdir /mnt/log
n=0
while true; do
    n=$((n+1))
    head -c 65536 /dev/urandom > /mnt/log/$n
    sync
    echo "DV-TICK $n $(md5sum < /mnt/log/$n | cut -c1-32)"
    sleep 1
done
"""


def kernel() -> str | None:
    found = sorted(glob.glob("/boot/vmlinuz-*"))
    return found[-1] if found else None


def _module_order(release: str) -> list[str]:
    """The .ko files of MODULES and their dependencies, dependencies first."""
    base = f"/lib/modules/{release}"
    deps: dict[str, list[str]] = {}
    with open(f"{base}/modules.dep") as f:
        for line in f:
            mod, _, rest = line.partition(":")
            deps[mod] = rest.split()
    by_name = {re.sub(r"\.ko.*$", "", os.path.basename(m)).replace("-", "_"): m for m in deps}
    order: list[str] = []

    def visit(m: str) -> None:
        if m in order:
            return
        for d in deps[m]:
            visit(d)
        order.append(m)

    for name in MODULES:
        visit(by_name[name])
    return [f"{base}/{m}" for m in order]


def build_initramfs(work: Path) -> str:
    """A gzip'd newc cpio with busybox, the modules and /init; returns its path."""
    k = kernel()
    assert k is not None
    release = os.path.basename(k).removeprefix("vmlinuz-")
    root = work / "initramfs"
    for d in ("bin", "proc", "sys", "dev", "mnt", "lib/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    insmods = []
    for ko in _module_order(release):
        dst = root / "lib/modules" / os.path.basename(ko)
        shutil.copy(ko, dst)
        insmods.append(f"insmod /lib/modules/{dst.name}")
    (root / "init").write_text(INIT.format(insmods="\n".join(insmods)))
    (root / "init").chmod(0o755)
    if not (root / "bin/sh").is_symlink():
        (root / "bin/sh").symlink_to("busybox")
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files,
                          capture_output=True, check=True).stdout
    out = work / "initramfs.cpio.gz"
    out.write_bytes(gzip.compress(cpio, 1))
    return str(out)


def build_disk(work: Path, mib: int = 64) -> str:
    """An ext4 image holding run.sh (no metadata checksums: no crc32c module needed)."""
    src = work / "disk-src"
    src.mkdir(exist_ok=True)
    (src / "run.sh").write_text(RUN)
    (src / "filler").write_bytes(os.urandom(8 << 20))  # some data to copy
    img = work / "disk.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^metadata_csum,^64bit", "-d", str(src),
                    str(img), f"{mib}M"], check=True, capture_output=True)
    return str(img)


def qemu_cmd(initrd: str, log: str, *extra: str) -> list[str]:
    k = kernel()
    assert k is not None
    return ["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-cpu", "max", "-m", "256",
            "-smp", "1", "-display", "none", "-monitor", "none", "-nodefaults",
            "-no-reboot", "-kernel", k, "-initrd", initrd,
            "-append", "console=ttyS0 panic=-1 quiet loglevel=3",
            "-serial", f"file:{log}", *extra]
