"""Habits of Borg users: argument order, placeholders, delete -a GLOB."""

from __future__ import annotations

import hashlib
import random
import subprocess

import pytest
from support import dv, init_repo, needs_tool

MiB = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def disk_image(tmp_path) -> str:
    """An 8 MiB random MBR disk image, one raw partition filling it (nothing unused)."""
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.write(random.Random(10).randbytes(8 * MiB))
    subprocess.run(["sfdisk", "-q", path], input=b"label: dos\n,7MiB,L\n", check=True,
                   capture_output=True)
    return path


@needs_tool("sfdisk")
def test_disk_backup_takes_the_location_first(tmp_path, disk_image):
    repo = str(tmp_path / "repo")
    init_repo(repo)
    with open(disk_image, "rb") as f:
        want = sha(f.read())
    r = dv("disk", "backup", f"{repo}::new", disk_image)
    assert r.stderr == b""
    # the old order still works, with one deprecation line
    r = dv("disk", "backup", disk_image, f"{repo}::old")
    assert r.stderr.decode().splitlines() == [
        "diskvault: warning: `disk backup DEVICE REPO::ARCHIVE` is deprecated: write "
        "`disk backup REPO::ARCHIVE DEVICE`, like create"]
    for name in ("new", "old"):
        assert sha(dv("extract", "--stdout", f"{repo}::{name}").stdout) == want
    # with DISKVAULT_REPO: ::ARCHIVE is the location
    r = dv("disk", "backup", "::env", disk_image, env={"DISKVAULT_REPO": repo})
    assert r.stderr == b""
    assert dv("list", "--short", repo).stdout.decode().split() == ["new", "old", "env"]


@needs_tool("sfdisk")
def test_disk_backup_argument_errors(tmp_path, disk_image):
    repo = str(tmp_path / "repo")
    init_repo(repo)
    for args, msg in [
        ((f"{repo}::x",), "which disk? give --serial SERIAL or a DEVICE/IMAGE"),
        (("--serial", "S1", f"{repo}::x", disk_image),
         "give either --serial or a DEVICE/IMAGE, not both"),
        ((repo, disk_image), f"an archive name is needed: {repo}::ARCHIVE"),
    ]:
        r = dv("disk", "backup", *args, check=False)
        assert r.returncode == 2
        assert r.stderr.decode() == f"diskvault: error: {msg}\n"
    assert dv("list", "--short", repo).stdout == b""
