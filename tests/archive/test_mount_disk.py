"""Must-show: a whole-disk archive of a GPT disk (ext4, NTFS, FAT, XFS) mounted with real
FUSE — disk.img and every partition byte-identical to ``extract --stdout``, every file in
every ``partN.files`` tree with its original SHA-256 and metadata (XFS through the
read-only kernel mount, the rest through The Sleuth Kit); the same from S3; and one file
out with ``extract REPO::A disk/part1.files/etc/fstab``."""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from archive.mount_helpers import (
    PARTITIONS,
    build_disk,
    check_tree,
    mounted_archive,
    needs_disk_tools,
    needs_fuse,
    sha256,
)
from support import dv, init_repo, needs_loop

pytestmark = [needs_fuse, needs_loop, needs_disk_tools]


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict]]:
    return build_disk(tmp_path_factory.mktemp("disk"))


def _stdout_sha(location: str, *paths: str, env: dict | None = None) -> str:
    return hashlib.sha256(dv("extract", "--stdout", location, *paths, env=env).stdout
                          ).hexdigest()


def _loops_on(path: Path) -> list[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(path) in line]


def test_mounted_disk_archive(tmp_path: Path, disk: tuple[Path, dict[int, dict]]) -> None:
    image, contents = disk
    repo = str(tmp_path / "repo")
    env = init_repo(repo)
    dv("disk", "backup", f"{repo}::d1", str(image), env=env)
    mnt = tmp_path / "mnt"
    with mounted_archive(f"{repo}::d1", mnt, env=env):
        assert sha256(mnt / "disk.img") == _stdout_sha(f"{repo}::d1", env=env)
        for number, fstype, _ in PARTITIONS:
            part = f"disk/part{number}"
            assert sha256(mnt / part) == _stdout_sha(f"{repo}::d1", part, env=env), part
            check_tree(mnt / f"{part}.files", contents[number], fstype)
        ext = mnt / "disk/part1.files"
        assert os.readlink(ext / "dir1/link") == "../etc/fstab"
        assert os.stat(ext / "dir2/hard").st_nlink == 2
        assert sha256(ext / "dir2/hard") == sha256(ext / "dir2/file0.bin")
        assert _loops_on(mnt), "XFS is read through a loop device on the mount"
        assert not os.access(ext / "etc/fstab", os.W_OK) or os.geteuid() == 0
        with pytest.raises(OSError):
            open(ext / "etc/fstab", "r+b")  # noqa: SIM115 - read-only
    assert not _loops_on(mnt), "the loop device went with the mount"

    out = tmp_path / "out"
    out.mkdir()
    dv("extract", f"{repo}::d1", "disk/part1.files/etc/fstab", env=env, cwd=str(out))
    got = out / "disk/part1.files/etc/fstab"
    digest, size, mtime, perm = contents[1]["etc/fstab"]
    assert sha256(got) == digest and got.stat().st_size == size
    assert int(got.stat().st_mtime) == mtime and got.stat().st_mode & 0o7777 == perm
    r = dv("extract", "--stdout", f"{repo}::d1", "disk/part4.files/etc/fstab", env=env,
           check=False)  # XFS: TSK cannot read it, and extract mounts nothing
    assert r.returncode == 2 and b"xfs" in r.stderr and not r.stdout
    fat = dv("extract", "--stdout", f"{repo}::d1", "disk/part3.files/dir1/*", env=env).stdout
    want = b"".join((Path(image.parent) / "src3/dir1" / n).read_bytes()
                    for n in sorted(os.listdir(image.parent / "src3/dir1")))
    assert fat == want


def test_mounted_disk_archive_from_s3(tmp_path: Path, disk: tuple[Path, dict[int, dict]],
                                      s3_server) -> None:  # noqa: ANN001
    image, contents = disk
    repo = s3_server.url(f"mount-{uuid.uuid4().hex[:10]}")
    env = init_repo(repo)
    dv("disk", "backup", f"{repo}::d1", str(image), env=env)
    mnt = tmp_path / "mnt"
    with mounted_archive(f"{repo}::d1", mnt, env=env):
        assert sha256(mnt / "disk.img") == _stdout_sha(f"{repo}::d1", env=env)
        digest, size, mtime, _ = contents[2]["dir1/file3.bin"]
        f = mnt / "disk/part2.files/dir1/file3.bin"
        assert sha256(f) == digest and f.stat().st_size == size
        assert int(f.stat().st_mtime) == mtime
