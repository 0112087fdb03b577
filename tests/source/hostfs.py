"""Helpers for the point-in-time tests: real filesystems on loop devices, writers that
must make progress, FIFOs that hold diskvault mid-backup, polling with deadlines."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from support import loop_device

DEADLINE = 120.0  # generous: CI machines are busy; a pass never waits this long


def wait_for(cond: Callable[[], object], what: str, deadline: float = DEADLINE) -> object:
    """Poll ``cond`` until it is true; fail naming ``what`` after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)  # polling interval of a condition, not a stand-in for one


@contextlib.contextmanager
def mounted(tmp_path, fstype: str, mib: int = 300) -> Iterator[str]:
    """A fresh ``fstype`` filesystem on a loop device, mounted; unmounted afterwards
    (thawed first, should a failing test have left it frozen)."""
    img = tmp_path / f"{fstype}.img"
    with open(img, "wb") as f:
        f.truncate(mib << 20)
    mkfs = {"btrfs": ["mkfs.btrfs", "-q"], "ext4": ["mkfs.ext4", "-q", "-F"],
            "xfs": ["mkfs.xfs", "-q"]}[fstype]
    subprocess.run([*mkfs, str(img)], check=True, capture_output=True)
    mnt = tmp_path / f"mnt-{fstype}"
    mnt.mkdir()
    with loop_device(str(img)) as dev:
        subprocess.run(["mount", dev, str(mnt)], check=True)
        try:
            yield str(mnt)
        finally:
            subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True, check=False)
            subprocess.run(["umount", str(mnt)], check=True)


def fifo_has_reader(path: str) -> int | None:
    """Open ``path`` for writing if a reader has it open (else None): diskvault is then
    blocked reading it, mid-backup, for as long as the returned fd stays open."""
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return None
        raise


RECORD = 64


def record(i: int) -> bytes:
    return (f"record {i:08d} ".ljust(RECORD - 1, ".") + "\n").encode()


WRITER = r"""
import os, select, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
i = 0
while not select.select([0], [], [], 0)[0]:   # until the test closes our stdin
    os.write(fd, (f"record {i:08d} ".ljust(63, ".") + "\n").encode())
    os.fsync(fd)
    i += 1
"""


def start_appender(path: str) -> subprocess.Popen:
    """A writer appending numbered, fsync'ed records to ``path`` until its stdin closes."""
    return subprocess.Popen([sys.executable, "-c", WRITER, path], stdin=subprocess.PIPE)


def stop(proc: subprocess.Popen) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=DEADLINE) == 0


def check_prefix(data: bytes) -> int:
    """``data`` is a gap-free prefix of the records (the last one possibly cut short);
    return the number of whole records."""
    n = len(data) // RECORD
    for i in range(n):
        assert data[i * RECORD:(i + 1) * RECORD] == record(i), f"record {i} is wrong"
    assert record(n).startswith(data[n * RECORD:]), "a torn record that is no prefix"
    return n


def start_one_write(path: str) -> subprocess.Popen:
    """A process that writes and fsyncs one block on ``path``'s filesystem and exits: it
    sleeps uninterruptibly while that filesystem is frozen."""
    code = ("import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT, 0o644); "
            "os.write(fd, b'x'*4096); os.fsync(fd)")
    return subprocess.Popen([sys.executable, "-c", code, path])


def state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return "gone"
    return data[data.rindex(b")") + 2:].split()[0].decode()


def snapshots_in(d: str) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith(".diskvault-snap-"))
