#!/usr/bin/env python3
"""Instant restore: how soon a guest runs from a backup, local and on S3 (SeaweedFS).

The guest of the test suite (tests/serve/guest.py: Debian's kernel, a busybox
initramfs, an ext4 disk whose run.sh prints ``DV-BOOT-OK``), under TCG. Per repository:
time from starting ``instant-restore`` (QEMU already started, paused) to the first
byte served, to the guest's ``DV-BOOT-OK`` (its "login prompt": userland from the
backed-up disk runs), and to the copy being complete; and, for scale, the same guest
booted from a local raw image.

    python3 bench/bench_instant.py [--disk-mib 256]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from serve.guest import build_disk, build_initramfs, qemu_cmd  # noqa: E402
from storage.servers import SeaweedServer  # noqa: E402

DV = [sys.executable, "-m", "diskvault"]
ENV = {**os.environ, "DISKVAULT_PASSPHRASE": "bench"}


def wait_serial(log: Path, marker: str, proc: subprocess.Popen, timeout: float = 900) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if log.exists() and marker in log.read_text(errors="replace"):
            return time.perf_counter()
        if proc.poll() is not None:
            raise SystemExit(f"QEMU exited before {marker}")
        time.sleep(0.05)
    raise SystemExit(f"no {marker} within {timeout} s")


def boot_local(work: Path, initrd: str, disk: str) -> float:
    log = work / "local.log"
    t0 = time.perf_counter()
    vm = subprocess.Popen(qemu_cmd(initrd, str(log), "-drive",
                                   f"file={disk},format=raw,if=virtio,snapshot=on"))
    try:
        return wait_serial(log, "DV-BOOT-OK", vm) - t0
    finally:
        vm.kill()
        vm.wait()


def instant(work: Path, initrd: str, repo: str, tag: str) -> tuple[float, float]:
    log, qmp = work / f"{tag}.log", str(work / f"{tag}.qmp")
    target = work / f"{tag}.qcow2"
    vm = subprocess.Popen(qemu_cmd(initrd, str(log), "-S", "-qmp",
                                   f"unix:{qmp},server=on,wait=off"))
    try:
        while not os.path.exists(qmp):
            time.sleep(0.05)
        t0 = time.perf_counter()
        r = subprocess.Popen([*DV, "instant-restore", "--qmp", qmp, f"{repo}::vm",
                              str(target)], env=ENV, stdout=subprocess.DEVNULL)
        boot = wait_serial(log, "DV-BOOT-OK", vm) - t0
        if r.wait(900) != 0:
            raise SystemExit(f"instant-restore failed ({tag})")
        done = time.perf_counter() - t0
        return boot, done
    finally:
        vm.kill()
        vm.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--disk-mib", type=int, default=256)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dvinstant-"))
    server = None
    try:
        initrd = build_initramfs(work)
        disk = build_disk(work, a.disk_mib)
        local_boot = boot_local(work, initrd, disk)
        server = SeaweedServer(work / "seaweedfs", bucket="bench")
        server.start_fresh()
        rows = []
        for tag, repo in (("local", str(work / "repo")), ("s3", server.url("dv"))):
            subprocess.run([*DV, "init", "-e", "repokey", repo], env=ENV, check=True)
            subprocess.run([*DV, "create", f"{repo}::vm", disk], env=ENV, check=True)
            rows.append((tag, *instant(work, initrd, repo, tag)))
        print(f"\nguest ({a.disk_mib} MiB ext4 disk, TCG): boot from a local raw image to "
              f"DV-BOOT-OK {local_boot:.1f} s")
        print(f"{'repository':12s} {'to DV-BOOT-OK':>14s} {'copy complete':>14s}")
        for tag, boot, done in rows:
            print(f"{tag:12s} {boot:13.1f}s {done:13.1f}s")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
