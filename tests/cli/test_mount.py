"""diskvault mount / umount with real FUSE: Borg's layout, directory trees with their
metadata, sparse image files (SEEK_HOLE/SEEK_DATA, cp --sparse, losetup -r), trees inside
partitioned images, and bad input (missing/busy mount point, unknown archive, damaged
chunks, SIGKILL of the mount process, umount of a busy mount)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from archive.mount_helpers import (
    force_cleanup,
    is_mounted,
    mounted_archive,
    mounts_below,
    needs_fuse,
    sha256,
    wait_for,
)
from support import dv, init_repo, loop_device, make_vm_image, needs_root, needs_tool

from diskvault.archive.view import ArchiveView
from diskvault.repository.pack import pack_key
from diskvault.repository.repo import Repository
from diskvault.storage.url import open_store

pytestmark = [needs_fuse, needs_root]
CHUNK = 256 << 10


def _tree(root: Path) -> Path:
    """A directory tree with every kind of metadata the mount must show."""
    (root / "etc").mkdir(parents=True)
    (root / "etc/fstab").write_bytes(b"UUID=1 / ext4 defaults 0 1\n")
    (root / "data").mkdir()
    (root / "data/big").write_bytes(os.urandom(700_000))
    os.chmod(root / "data/big", 0o640)
    os.chown(root / "data/big", 1234, 5678)
    os.symlink("../etc/fstab", root / "data/link")
    os.link(root / "etc/fstab", root / "data/hard")
    os.setxattr(root / "etc/fstab", b"user.origin", b"test")
    os.chmod(root / "etc", 0o750)
    for p in (root / "data/big", root / "etc/fstab", root / "etc"):
        os.utime(p, ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))
    return root


def _ext4_image(path: Path, src: Path, mib: int = 16) -> Path:
    with open(path, "wb") as f:
        f.truncate(mib << 20)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", src, path], check=True)
    return path


def _gpt_image(path: Path, part: Path) -> Path:
    size = part.stat().st_size
    with open(path, "wb") as f:
        f.truncate(size + (2 << 20))
    subprocess.run(["sfdisk", "-q", str(path)], check=True, capture_output=True,
                   input=f"label: gpt\nstart=2048, size={size // 512}\n".encode())
    subprocess.run(["dd", f"if={part}", f"of={path}", "bs=1M", "seek=1", "conv=notrunc",
                    "status=none"], check=True)
    return path


@pytest.fixture
def repo(tmp_path: Path) -> tuple[str, dict]:
    r = str(tmp_path / "repo")
    return r, init_repo(r, "none")


def _one_error_line(r: subprocess.CompletedProcess, match: str) -> None:
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err


def test_repository_layout_and_metadata(tmp_path: Path, repo: tuple[str, dict]) -> None:
    loc, env = repo
    src = _tree(tmp_path / "src")
    dv("create", f"{loc}::one", str(src), env=env, cwd=str(tmp_path))
    dv("create", f"{loc}::two", str(src / "etc"), env=env)
    mnt = tmp_path / "mnt"
    with mounted_archive(loc, mnt, env=env):
        assert sorted(os.listdir(mnt)) == ["one", "two"]
        base = mnt / "one" / str(src).lstrip("/")
        for rel in ("etc", "etc/fstab", "data/big", "data/link", "data/hard"):
            a, b = os.lstat(src / rel), os.lstat(base / rel)
            assert (a.st_mode, a.st_uid, a.st_gid, a.st_nlink) == \
                (b.st_mode, b.st_uid, b.st_gid, b.st_nlink), rel
            if not stat.S_ISLNK(a.st_mode):
                assert a.st_mtime_ns == b.st_mtime_ns, rel
            if stat.S_ISREG(a.st_mode):
                assert a.st_size == b.st_size and sha256(src / rel) == sha256(base / rel)
        assert os.readlink(base / "data/link") == "../etc/fstab"
        assert os.getxattr(base / "etc/fstab", b"user.origin") == b"test"
        with pytest.raises(OSError) as e:
            open(base / "etc/fstab", "ab")  # noqa: SIM115
        assert e.value.errno == errno.EROFS
        assert (mnt / "two" / str(src / "etc/fstab").lstrip("/")).read_bytes() == \
            (src / "etc/fstab").read_bytes()


@needs_tool("mke2fs", "losetup", "cp")
def test_sparse_image_files(tmp_path: Path, repo: tuple[str, dict]) -> None:
    loc, env = repo
    vm = tmp_path / "vm.img"
    make_vm_image(str(vm), 12)
    fs = _ext4_image(tmp_path / "fs.img", _tree(tmp_path / "src"))
    dv("create", "--chunker-params", f"fixed,{CHUNK}", f"{loc}::a", "vm.img", "fs.img",
       env=env, cwd=str(tmp_path))
    want = dv("extract", "--stdout", f"{loc}::a", "vm.img", env=env).stdout
    mnt = tmp_path / "mnt"
    with mounted_archive(f"{loc}::a", mnt, env=env):
        f = mnt / "vm.img"
        assert f.read_bytes() == want
        fd = os.open(f, os.O_RDONLY)
        try:  # make_vm_image: MiB 2 is zeros, MiB 3 a hole: both are holes in the mount
            assert os.lseek(fd, 0, os.SEEK_HOLE) == 2 << 20
            assert os.lseek(fd, 2 << 20, os.SEEK_DATA) == 4 << 20
            with pytest.raises(OSError) as e:
                os.lseek(fd, len(want), os.SEEK_DATA)
            assert e.value.errno == errno.ENXIO
        finally:
            os.close(fd)
        copy = tmp_path / "copy.img"
        subprocess.run(["cp", "--sparse=always", str(f), str(copy)], check=True)
        assert copy.read_bytes() == want and copy.stat().st_blocks * 512 < len(want)
        # a loop device over the FUSE file, and the kernel's ext4 on it
        inner = tmp_path / "inner"
        inner.mkdir()
        with loop_device(str(mnt / "fs.img"), read_only=True) as dev:
            subprocess.run(["mount", "-o", "ro", dev, str(inner)], check=True)
            try:
                assert (inner / "etc/fstab").read_bytes() == (tmp_path / "src/etc/fstab"
                                                               ).read_bytes()
            finally:
                subprocess.run(["umount", str(inner)], check=True)
        # and the same files through The Sleuth Kit, no loop device needed
        tsk = mnt / "fs.img.files"
        assert sha256(tsk / "data/big") == sha256(tmp_path / "src/data/big")
        st = os.stat(tsk / "data/big")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1234, 5678)
        assert os.readlink(tsk / "data/link") == "../etc/fstab"
    assert fs.exists()


@needs_tool("mke2fs", "sfdisk", "dd")
def test_partitioned_image_item(tmp_path: Path, repo: tuple[str, dict]) -> None:
    loc, env = repo
    part = _ext4_image(tmp_path / "part.img", _tree(tmp_path / "src"), 8)
    _gpt_image(tmp_path / "gpt.img", part)
    dv("create", f"{loc}::p", "gpt.img", env=env, cwd=str(tmp_path))
    mnt = tmp_path / "mnt"
    with mounted_archive(f"{loc}::p", mnt, env=env):
        assert os.listdir(mnt / "gpt.img.files") == ["part1"]
        got = mnt / "gpt.img.files/part1/etc/fstab"
        assert got.read_bytes() == (tmp_path / "src/etc/fstab").read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    r = dv("extract", f"{loc}::p", "gpt.img.files/part1/etc/fstab", "nope", env=env,
           cwd=str(out), check=False)  # one bad path: nothing is written
    _one_error_line(r, "nope")
    assert os.listdir(out) == []
    dv("extract", f"{loc}::p", "gpt.img.files/part1/data", env=env, cwd=str(out))
    big = out / "gpt.img.files/part1/data/big"
    assert sha256(big) == sha256(tmp_path / "src/data/big")
    assert big.stat().st_mtime_ns // 10**9 == 1_600_000_000
    assert os.readlink(out / "gpt.img.files/part1/data/link") == "../etc/fstab"
    r = dv("extract", "--stdout", f"{loc}::p", "gpt.img.files/part1/etc/fstab", env=env)
    assert r.stdout == (tmp_path / "src/etc/fstab").read_bytes()


def test_bad_input(tmp_path: Path, repo: tuple[str, dict]) -> None:
    loc, env = repo
    (tmp_path / "f").write_bytes(b"x" * 1000)
    dv("create", f"{loc}::a", "f", env=env, cwd=str(tmp_path))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _one_error_line(dv("mount", loc, str(tmp_path / "nowhere"), env=env, check=False),
                    "does not exist")
    _one_error_line(dv("mount", f"{loc}::nope", str(mnt), env=env, check=False),
                    "nope")
    assert not is_mounted(mnt)
    _one_error_line(dv("mount", str(tmp_path / "norepo"), str(mnt), env=env, check=False),
                    "norepo")
    assert not is_mounted(mnt)
    _one_error_line(dv("umount", str(mnt), check=False), "is not mounted")
    with mounted_archive(f"{loc}::a", mnt, env=env):
        _one_error_line(dv("mount", f"{loc}::a", str(mnt), env=env, check=False), "busy")
    out = tmp_path / "out"
    out.mkdir()
    _one_error_line(dv("extract", f"{loc}::a", "f.files/x", env=env, check=False,
                       cwd=str(out)), "f.files/x")
    assert os.listdir(out) == []


def test_damaged_chunk_is_eio_on_its_range(tmp_path: Path, repo: tuple[str, dict]) -> None:
    loc, env = repo
    make_vm_image(str(tmp_path / "vm.img"), 4)
    dv("create", "--chunker-params", f"fixed,{CHUNK}", f"{loc}::a", "vm.img", env=env,
       cwd=str(tmp_path))
    want = dv("extract", "--stdout", f"{loc}::a", env=env).stdout
    rp = Repository.open(open_store(loc), lambda c: "secret")
    (item,) = [i for i in ArchiveView.open(rp, "a").items if i.extents is not None]
    cid = [c for _, _, c in item.extents if c is not None][1]  # bytes CHUNK .. 2*CHUNK
    loc_ = rp.index.get(cid)
    rp.close()
    pack = Path(loc) / pack_key(loc_.pack)
    buf = bytearray(pack.read_bytes())
    buf[loc_.offset + loc_.length // 2] ^= 0x40
    pack.write_bytes(bytes(buf))
    mnt = tmp_path / "mnt"
    with mounted_archive(f"{loc}::a", mnt, env=env):
        fd = os.open(mnt / "vm.img", os.O_RDONLY)
        try:
            for off in (CHUNK, 2 * CHUNK - 4096, CHUNK + 12345):
                with pytest.raises(OSError) as e:
                    os.pread(fd, 4096, off)
                assert e.value.errno == errno.EIO
            # images are direct_io: a read that touches the range fails whole; the bytes
            # just before it are fine
            with pytest.raises(OSError):
                os.pread(fd, 8192, CHUNK - 4096)
            assert os.pread(fd, 4096, CHUNK - 4096) == want[CHUNK - 4096 : CHUNK]
            assert os.pread(fd, CHUNK, 0) == want[:CHUNK]
            assert os.pread(fd, CHUNK, 2 * CHUNK) == want[2 * CHUNK : 3 * CHUNK]
        finally:
            os.close(fd)
        r = subprocess.run(["cat", str(mnt / "vm.img")], capture_output=True)
        assert r.returncode != 0 and b"Input/output error" in r.stderr
        assert want.startswith(r.stdout) and len(r.stdout) <= CHUNK


def test_sigkill_then_umount(tmp_path: Path, repo: tuple[str, dict]) -> None:
    loc, env = repo
    (tmp_path / "f").write_bytes(os.urandom(100_000))
    dv("create", f"{loc}::a", "f", env=env, cwd=str(tmp_path))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "diskvault", "mount", "--foreground",
                             f"{loc}::a", str(mnt)], env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: is_mounted(mnt) or proc.poll() is not None, "the mount")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert hashlib.sha256((mnt / "f").read_bytes()).digest() == \
            hashlib.sha256((tmp_path / "f").read_bytes()).digest()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        with pytest.raises(OSError) as e:
            os.listdir(mnt)
        assert e.value.errno == errno.ENOTCONN
        dv("umount", str(mnt))
        assert not is_mounted(mnt) and os.listdir(mnt) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_cleanup(mnt)


def test_umount_of_busy_mount_is_refused(tmp_path: Path, repo: tuple[str, dict]) -> None:
    loc, env = repo
    (tmp_path / "f").write_bytes(b"busy")
    dv("create", f"{loc}::a", "f", env=env, cwd=str(tmp_path))
    mnt = tmp_path / "mnt"
    with mounted_archive(f"{loc}::a", mnt, env=env):
        holder = subprocess.Popen(["sleep", "600"], cwd=str(mnt))
        try:
            r = dv("umount", str(mnt), check=False)
            _one_error_line(r, "busy")
            assert str(holder.pid) in r.stderr.decode()
            assert is_mounted(mnt)
        finally:
            holder.kill()
            holder.wait()
    assert not mounts_below(mnt)


def test_no_kernel_tree_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """XFS/btrfs need a kernel mount; without root the tree is absent, with a note."""
    from diskvault.archive import innerfs

    class XfsLike:
        size = 64 << 20

        def read(self, offset: int, length: int) -> bytes:
            return b"XFSB".ljust(length, b"\0")[:length] if offset == 0 else bytes(length)

    monkeypatch.setattr(innerfs.os, "geteuid", lambda: 1000)
    inner, note = innerfs.inspect(XfsLike(), fs_hint="xfs")
    assert inner is None and note is not None and "needs root" in note
    monkeypatch.setattr(innerfs.os, "geteuid", lambda: 0)
    inner, note = innerfs.inspect(XfsLike(), fs_hint="xfs")
    assert inner is not None and inner.kind == innerfs.KERNEL and "kernel mount" in (note or "")


def test_repository_gone_under_the_mount(tmp_path: Path, repo: tuple[str, dict]) -> None:
    """Reads of what is not cached fail with EIO (no hang); umount still works."""
    loc, env = repo
    make_vm_image(str(tmp_path / "vm.img"), 24)
    dv("create", "--chunker-params", f"fixed,{CHUNK}", f"{loc}::a", "vm.img", env=env,
       cwd=str(tmp_path))
    want = (tmp_path / "vm.img").read_bytes()
    mnt = tmp_path / "mnt"
    # a 16 MiB cache reads ahead at most 4 MiB: MiB 20 is fetched only when asked for
    with mounted_archive(f"{loc}::a", mnt, "-o", "cache_size=16", env=env):
        fd = os.open(mnt / "vm.img", os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == want[:4096]
            for d, _, names in os.walk(loc):  # what an open file still sees goes too
                for name in names:
                    os.truncate(os.path.join(d, name), 0)
            shutil.rmtree(loc)
            with pytest.raises(OSError) as e:
                os.pread(fd, 4096, 20 << 20)  # random data (make_vm_image), not cached
            assert e.value.errno == errno.EIO
            assert os.pread(fd, 4096, 0) == want[:4096]  # the cached chunk still serves
        finally:
            os.close(fd)


@needs_tool("mkfs.btrfs", "losetup")
def test_btrfs_tree_through_a_kernel_mount(tmp_path: Path, repo: tuple[str, dict]) -> None:
    """TSK has no btrfs: as root the tree is a read-only kernel mount, taken down by umount."""
    loc, env = repo
    img, fill = tmp_path / "bt.img", tmp_path / "fill"
    with open(img, "wb") as f:
        f.truncate(128 << 20)  # mkfs.btrfs wants ~114 MiB at least
    subprocess.run(["mkfs.btrfs", "-q", "-f", str(img)], check=True, capture_output=True)
    fill.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(fill)], check=True)
    try:
        (fill / "etc").mkdir()
        (fill / "etc/fstab").write_bytes(b"LABEL=root / btrfs defaults 0 0\n")
    finally:
        subprocess.run(["umount", str(fill)], check=True)
    dv("create", f"{loc}::b", "bt.img", env=env, cwd=str(tmp_path))
    mnt = tmp_path / "mnt"
    with mounted_archive(f"{loc}::b", mnt, env=env):
        assert (mnt / "bt.img.files/etc/fstab").read_bytes() == \
            b"LABEL=root / btrfs defaults 0 0\n"
        assert len(mounts_below(mnt)) == 2  # our FUSE mount and the kernel's btrfs on it
    # a whole repository: the kernel mount follows when the archive folder is first opened
    with mounted_archive(loc, mnt, env=env):
        fstab = mnt / "b/bt.img.files/etc/fstab"
        wait_for(fstab.exists, "the kernel mount of b/bt.img.files")
        assert fstab.read_bytes() == b"LABEL=root / btrfs defaults 0 0\n"
    r = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(mnt) not in r
