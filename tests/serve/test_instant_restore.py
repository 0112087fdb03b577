"""Instant restore with a real guest (Debian's kernel, a busybox initramfs, TCG).

The guest boots from the backup through QEMU's NBD client, writes a file a second while
``block-stream`` copies the disk to a local qcow2 target, keeps running on the target
once the copy is complete and the export is gone; the target then holds every write the
guest reported. The copy is held back (``--speed``) until the guest has written, then
let go over a second QMP monitor: the order is forced by events, not by timing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serve.guest import build_disk, build_initramfs, kernel, qemu_cmd
from support import dv, init_repo, needs_tool

pytestmark = [
    needs_tool("qemu-system-x86_64", "qemu-img", "busybox", "cpio", "mkfs.ext4", "debugfs",
               "e2fsck"),
    pytest.mark.skipif(kernel() is None, reason="needs a kernel in /boot (linux-image-amd64)"),
]

DEADLINE = 600.0  # a boot under TCG on a busy 2-core machine: generous, never a sleep


class Monitor:
    """The test's own QMP monitor (QEMU takes several)."""

    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rwb")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args: object) -> object:
        self.f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.f.flush()
        while True:
            msg = json.loads(self.f.readline())
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise AssertionError(f"{name}: {msg['error']}")

    def close(self) -> None:
        self.f.close()
        self.s.close()


def wait_for(cond, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + DEADLINE
    tail = (lambda: "; serial console: " + serial(log)[-1500:]) if log else (lambda: "")
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"QEMU exited ({proc.returncode}) while waiting for {what}"
                                 + tail())
        time.sleep(0.2)  # polling a condition, with a deadline
    raise AssertionError(f"timed out waiting for {what}" + tail())


def serial(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def ticks(log: Path) -> dict[int, str]:
    return {int(n): h for n, h in re.findall(r"DV-TICK (\d+) ([0-9a-f]{32})", serial(log))}


def wait_socket(path: str, proc: subprocess.Popen) -> None:
    wait_for(lambda: os.path.exists(path), f"socket {path}", proc)


def files_in_target(target: str, tmp: Path) -> dict[int, str]:
    """md5 of every /log file in the target's ext4, read without a guest (debugfs)."""
    raw = tmp / "target.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", target, str(raw)], check=True)
    # the guest was stopped, not shut down: replay its journal as a mount would
    fsck = subprocess.run(["e2fsck", "-fy", str(raw)], capture_output=True)
    assert fsck.returncode in (0, 1), fsck.stdout
    out = subprocess.run(["debugfs", "-R", "ls -l /log", str(raw)], capture_output=True,
                         text=True, check=True).stdout
    sums = {}
    for name in re.findall(r"\s(\d+)\s*$", out, re.M):
        data = subprocess.run(["debugfs", "-R", f"cat /log/{name}", str(raw)],
                              capture_output=True, check=True).stdout
        sums[int(name)] = hashlib.md5(data).hexdigest()
    raw.unlink()
    return sums


@pytest.mark.parametrize("second_boot", [
    False, pytest.param(True, marks=pytest.mark.slow)])
def test_instant_restore_real_guest(tmp_path: Path, second_boot: bool) -> None:
    initrd = build_initramfs(tmp_path)
    disk = build_disk(tmp_path)
    repo = str(tmp_path / "repo")
    env = init_repo(repo, "repokey")
    dv("create", f"{repo}::vm", disk, env=env)
    os.unlink(disk)  # the guest must come from the backup
    log, qmp, mon = tmp_path / "serial.log", str(tmp_path / "qmp.sock"), str(tmp_path / "t.sock")
    target = str(tmp_path / "target.qcow2")
    vm = subprocess.Popen(qemu_cmd(initrd, str(log), "-S",
                                   "-qmp", f"unix:{qmp},server=on,wait=off",
                                   "-qmp", f"unix:{mon},server=on,wait=off"))
    restore = None
    try:
        wait_socket(qmp, vm)
        wait_socket(mon, vm)
        restore = subprocess.Popen(
            [sys.executable, "-m", "diskvault", "instant-restore", "--qmp", qmp,
             "--speed", "64K", f"{repo}::vm", target],
            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        m = Monitor(mon)
        # the guest boots from the export and writes while the copy is held back
        wait_for(lambda: len(ticks(log)) >= 2, "the guest's first writes", vm, log)
        assert "DV-BOOT-OK" in serial(log)
        jobs = m.cmd("query-block-jobs")
        assert isinstance(jobs, list) and [j["device"] for j in jobs] == ["dv-restore"], jobs
        assert jobs[0]["offset"] < jobs[0]["len"]  # the copy is still running
        m.cmd("block-job-set-speed", device="dv-restore", speed=0)
        out, err = restore.communicate(timeout=DEADLINE)
        assert restore.returncode == 0, err.decode()
        assert b"is complete" in out
        # the VM runs on the target alone: no backing, the export node is gone
        nodes = m.cmd("query-named-block-nodes")
        assert isinstance(nodes, list)
        assert not any(n.get("node-name") == "dv-backup" for n in nodes)
        assert not any(n.get("backing_file") for n in nodes)
        # ... and keeps writing
        done_at = max(ticks(log))
        wait_for(lambda: max(ticks(log)) >= done_at + 2, "writes after the copy", vm, log)
        m.cmd("stop")  # every tick printed so far was synced before it was printed
        written = ticks(log)
        m.cmd("quit")
        vm.wait(DEADLINE)
        m.close()
    finally:
        for p in (restore, vm):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        if restore is not None:
            for f in (restore.stdout, restore.stderr):
                if f:
                    f.close()
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", target],
                                     capture_output=True, check=True).stdout)
    assert "backing-filename" not in info and info["virtual-size"] == 64 << 20
    subprocess.run(["qemu-img", "check", "-q", target], check=True)
    got = files_in_target(target, tmp_path)
    assert all(got.get(n) == h for n, h in written.items()), (written, got)
    if not second_boot:
        return
    # the target boots on its own and the guest finds its writes
    log2 = tmp_path / "serial2.log"
    vm = subprocess.Popen(qemu_cmd(initrd, str(log2), "-drive",
                                   f"file={target},format=qcow2,if=virtio"))
    try:
        wait_for(lambda: "DV-DONE" in serial(log2), "the second boot", vm, log2)
    finally:
        if vm.poll() is None:
            vm.kill()
        vm.wait()
    seen = dict(re.findall(r"DV-SUM (\d+) ([0-9a-f]{32})", serial(log2)))
    assert all(seen.get(str(n)) == h for n, h in written.items()), (written, seen)


def paused_qemu(tmp: Path) -> tuple[subprocess.Popen, str]:
    """A QEMU without a guest, paused before it starts: block jobs run all the same."""
    qmp = str(tmp / "q.sock")
    vm = subprocess.Popen(["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-S",
                           "-nodefaults", "-display", "none", "-monitor", "none",
                           "-qmp", f"unix:{qmp},server=on,wait=off"])
    wait_socket(qmp, vm)
    return vm, qmp


@pytest.fixture
def image_archive(tmp_path: Path) -> tuple[str, dict, bytes]:
    from support import make_vm_image

    img = str(tmp_path / "vm.img")
    make_vm_image(img, 12)
    repo = str(tmp_path / "repo")
    env = init_repo(repo, "none")
    dv("create", "--chunker-params", "fixed,262144", f"{repo}::vm", img, env=env)
    return repo, env, dv("extract", "--stdout", f"{repo}::vm", env=env).stdout


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_copy_is_byte_identical(image_archive, tmp_path: Path, fmt: str) -> None:
    """block-stream (qcow2) and mirror + pivot (raw), without a guest writing."""
    repo, env, want = image_archive
    vm, qmp = paused_qemu(tmp_path)
    target = str(tmp_path / f"target.{fmt}")
    try:
        r = dv("instant-restore", "--qmp", qmp, "--no-start", "--format", fmt,
               f"{repo}::vm", target, env=env, timeout=DEADLINE)
        assert b"is complete" in r.stdout
        m = Monitor(qmp)  # the monitor diskvault used, free again
        nodes = m.cmd("query-named-block-nodes")
        assert isinstance(nodes, list)
        names = {n.get("node-name") for n in nodes}
        # the disk is the target alone: qcow2 streamed into, raw pivoted to
        assert "dv-backup" not in names
        assert ("dv-disk" in names) if fmt == "qcow2" else ("dv-target" in names
                                                            and "dv-disk" not in names)
        m.cmd("quit")
        m.close()
        vm.wait(DEADLINE)
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()
    raw = tmp_path / "check.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", target, str(raw)],
                   check=True)
    assert raw.read_bytes() == want
    assert not os.path.exists(target + ".dv-overlay.qcow2")
    if fmt == "qcow2":
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", target],
                                         capture_output=True, check=True).stdout)
        assert "backing-filename" not in info


def test_bad_input_leaves_nothing(image_archive, tmp_path: Path) -> None:
    repo, env, _ = image_archive
    target = tmp_path / "t.qcow2"
    vm, qmp = paused_qemu(tmp_path)
    try:
        for args, msg in [
            (["--qmp", str(tmp_path / "none.sock"), f"{repo}::vm", str(target)],
             "does not exist"),
            (["--qmp", qmp, f"{repo}::nope", str(target)], "archive 'nope' does not exist"),
            (["--qmp", qmp, f"{repo}::vm", str(target), "no/item"], "has no item"),
            # QEMU refuses the device: the nodes and the new image are taken back
            (["--qmp", qmp, "--device", "no-such-device", f"{repo}::vm", str(target)],
             "QEMU refused device_add"),
        ]:
            r = dv("instant-restore", *args, env=env, check=False, timeout=DEADLINE)
            err = r.stderr.decode()
            assert r.returncode == 2 and err.count("\n") == 1 and msg in err, (args, err)
            assert not target.exists()
        target.write_bytes(b"keep")
        r = dv("instant-restore", "--qmp", qmp, f"{repo}::vm", str(target), env=env,
               check=False)
        assert r.returncode == 2 and "exists" in r.stderr.decode()
        assert target.read_bytes() == b"keep"
        m = Monitor(qmp)
        assert m.cmd("query-named-block-nodes") == []
        m.cmd("quit")
        m.close()
        vm.wait(DEADLINE)
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()
