"""Mount tests' helpers: skips, mounting with guaranteed cleanup, a multi-filesystem disk."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import dv, have_root, have_tool


def _fuse_ok() -> tuple[bool, str]:
    if not os.path.exists("/dev/fuse"):
        return False, "needs /dev/fuse"
    if not have_tool("fusermount3"):
        return False, "needs fusermount3 (Debian fuse3)"
    try:
        import mfusepy  # noqa: F401
        import pytsk3  # noqa: F401
    except (ImportError, OSError) as e:
        return False, f"needs the mount extra (mfusepy, pytsk3): {e}"
    return True, ""


_ok, _why = _fuse_ok()
needs_fuse = pytest.mark.skipif(not _ok, reason=_why)


def is_mounted(path: str | Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def mounts_below(path: str | Path) -> list[str]:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f
                if line.split()[4] == real or line.split()[4].startswith(real + "/")]


def wait_for(cond, what: str, deadline: float = 60.0) -> None:  # noqa: ANN001
    """Poll ``cond`` until true (a generous deadline: the machine may be busy)."""
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def force_cleanup(mnt: str | Path) -> None:
    """Last resort in ``finally``: nothing may stay mounted after a test."""
    for mp in reversed(mounts_below(mnt)):
        subprocess.run(["umount", "-l", mp], check=False, capture_output=True)


@contextlib.contextmanager
def mounted_archive(location: str, mnt: Path, *opts: str, env: dict | None = None
                    ) -> Iterator[Path]:
    """``diskvault mount`` (daemon: returns when ready), always unmounted afterwards."""
    mnt.mkdir(exist_ok=True)
    try:
        # returns once the mount is ready, holding none of our pipes (or this would hang)
        dv("mount", *opts, location, str(mnt), env=env, timeout=120)
        assert is_mounted(mnt)
        yield mnt
    finally:
        try:
            if is_mounted(mnt):
                r = dv("umount", str(mnt), check=False, timeout=120)
                assert r.returncode == 0, f"umount failed: {r.stderr.decode()}"
            assert not mounts_below(mnt), "a mount was left behind"
        finally:
            force_cleanup(mnt)


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


# --- a GPT disk with ext4, NTFS, FAT and XFS partitions, filled with files --------

MiB = 1 << 20
# (partition number, filesystem, size in MiB); mkfs.xfs wants 300 MB unless told it is a test
PARTITIONS = [(1, "ext4", 32), (2, "ntfs", 32), (3, "vfat", 32), (4, "xfs", 64)]
T0 = 1_700_000_000  # an even second: FAT keeps mtimes to 2 s


def make_tree(root: Path, seed: int, fat: bool = False) -> dict[str, tuple[str, int, int, int]]:
    """A small tree with etc/fstab; returns path → (sha256, size, mtime s, perm bits)."""
    rnd = random.Random(seed)
    files = {"etc/fstab": b"/dev/vda1 / ext4 errors=remount-ro 0 1\n"}
    for d in range(3):
        for i in range(4):
            size = rnd.choice([0, 1, 4095, 4096, 70_000, rnd.randint(1, 600_000)])
            files[f"dir{d}/file{i}.bin"] = rnd.randbytes(size)
    files["dir0/sub/deep.txt"] = b"text " * 5000
    out = {}
    for n, (rel, data) in enumerate(sorted(files.items())):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        perm = 0o644 if fat else rnd.choice([0o600, 0o644, 0o640, 0o755])
        os.chmod(p, perm)
        mtime = T0 + 2 * n * 3600
        os.utime(p, (mtime, mtime))
        out[rel] = (hashlib.sha256(data).hexdigest(), len(data), mtime, perm)
    return out


def _fill_loop_mounted(img: Path, src: Path, fstype: str, work: Path) -> None:
    mnt = work / f"fill-{fstype}"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", img, mnt], check=True, capture_output=True)
    try:
        subprocess.run(["cp", "-a", f"{src}/.", str(mnt)], check=True)
    finally:
        subprocess.run(["umount", mnt], check=True)


def _fill_ntfs(img: Path, src: Path, work: Path) -> None:
    mnt = work / "fill-ntfs"
    mnt.mkdir()
    # foreground ntfs-3g: its exit (after umount) means every write reached the image
    proc = subprocess.Popen(["ntfs-3g", "-o", "no_detach", str(img), str(mnt)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: is_mounted(mnt) or proc.poll() is not None, "ntfs-3g")
        assert proc.poll() is None, "ntfs-3g failed"
        subprocess.run(["cp", "-r", "--preserve=timestamps", f"{src}/.", str(mnt)],
                       check=True)
    finally:
        subprocess.run(["umount", mnt], check=False)
        proc.wait(timeout=120)


def build_fs(fstype: str, img: Path, mib: int, src: Path, work: Path) -> None:
    with open(img, "wb") as f:
        f.truncate(mib * MiB)
    if fstype == "ext4":
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", src, img], check=True)
    elif fstype == "xfs":
        env = dict(os.environ, TEST_DIR="1", TEST_DEV="1", QA_CHECK_FS="1")
        subprocess.run(["mkfs.xfs", "-q", "-f", img], check=True, env=env)
        _fill_loop_mounted(img, src, fstype, work)
    elif fstype == "ntfs":
        subprocess.run(["mkntfs", "-Q", "-F", "-q", img], check=True, capture_output=True)
        _fill_ntfs(img, src, work)
    elif fstype == "vfat":
        subprocess.run(["mkfs.vfat", img], check=True, capture_output=True)
        names = [str(p) for p in sorted(src.iterdir())]
        subprocess.run(["mcopy", "-s", "-m", "-i", img, *names, "::/"], check=True,
                       env=dict(os.environ, TZ="UTC", MTOOLS_SKIP_CHECK="1"))


def build_disk(work: Path) -> tuple[Path, dict[int, dict]]:
    """The disk image and, per partition number, the files put in it."""
    disk = work / "disk.img"
    total = 1 + sum(m for _, _, m in PARTITIONS) + 1
    with open(disk, "wb") as f:
        f.truncate(total * MiB)
    script = "label: gpt\n" + "".join(f"size={m}MiB\n" for _, _, m in PARTITIONS)
    subprocess.run(["sfdisk", "-q", str(disk)], input=script.encode(), check=True,
                   capture_output=True)
    contents: dict[int, dict] = {}
    start = 1
    for number, fstype, mib in PARTITIONS:
        src = work / f"src{number}"
        contents[number] = make_tree(src, seed=number, fat=fstype == "vfat")
        if fstype == "ext4":  # links too, where the filesystem has them
            os.symlink("../etc/fstab", src / "dir1" / "link")
            os.link(src / "dir2" / "file0.bin", src / "dir2" / "hard")
        img = work / f"part{number}.img"
        build_fs(fstype, img, mib, src, work)
        subprocess.run(["dd", f"if={img}", f"of={disk}", "bs=1M", f"seek={start}",
                        "conv=notrunc,sparse", "status=none"], check=True)
        img.unlink()
        start += mib
    return disk, contents


def check_tree(root: Path, expected: dict[str, tuple[str, int, int, int]], fstype: str) -> None:
    """Every file has the original's SHA-256, size, mtime (and mode where kept); no
    file is missing or extra."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "lost+found"]
        for name in filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(os.lstat(p).st_mode) or rel == "dir2/hard":
                continue
            seen.add(rel)
    assert seen == set(expected), (fstype, sorted(seen ^ set(expected)))
    for rel, (digest, size, mtime, perm) in expected.items():
        p = root / rel
        st = os.stat(p)
        assert st.st_size == size, (fstype, rel)
        assert sha256(p) == digest, (fstype, rel)
        assert int(st.st_mtime) == mtime, (fstype, rel, int(st.st_mtime), mtime)
        if fstype in ("ext4", "xfs"):
            assert stat.S_IMODE(st.st_mode) == perm, (fstype, rel, oct(st.st_mode))


def tools_missing() -> list[str]:
    tools = ["sfdisk", "mke2fs", "mkfs.xfs", "mkntfs", "ntfs-3g", "mkfs.vfat", "mcopy", "dd"]
    return [t for t in tools if shutil.which(t) is None]


needs_disk_tools = pytest.mark.skipif(
    bool(tools_missing()) or not have_root(),
    reason=f"needs root and {', '.join(tools_missing()) or 'loop devices'}")
