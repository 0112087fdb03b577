"""The seed's ntfsclone recipe (shared/seed/…), with `borg` replaced by `diskvault`, verbatim.

Adaptations, all outside the snippets' own lines (as in test_seed.py):
- the kernel here makes no partition nodes, so each partition is a loop device over its
  byte range, and a block-device node named like a partition (``…/src-p1``) points at
  it; ``sed -e "$MAP"`` renames sfdisk's ``/dev/loopNp1`` to those nodes. Their directory
  has no digits in its name, because the restore snippet greps the partition listing
  for ``$DISKp?$PARTNUM`` (``$DISKp`` is unset, so that is "any line with the number");
- ``partprobe`` (not installed; it would find no partitions on a loop device anyway) is
  a no-op on PATH, and the restore runs without ``set -u`` for that same ``$DISKp``.
Then the same disk goes through ``disk backup`` / ``disk restore`` for comparison.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import stat
import string
import subprocess
import sys

import pytest
from archive.test_disk_images import (
    MiB,
    make_disk,
    needs_kit,
    random_fill,
    sha256_range,
    verify_partition,
    verify_table,
)
from support import DV_ENTRY, dv, loop_device, needs_loop, needs_tool

pytestmark = [needs_loop, needs_kit, needs_tool("ntfsclone", "ntfsfix", "ntfscat", "e2fsck")]

BACKUP = r"""
HEADER_SIZE=$(sfdisk -lo Start $DISK | grep -A1 -P 'Start$' | tail -n1 | xargs echo)
PARTITIONS=$(sfdisk -lo Device,Type $DISK | sed -e '1,/Device\s*Type/d' | sed -e "$MAP")
dd if=$DISK count=$HEADER_SIZE | diskvault create repo::hostname-partinfo -
echo "$PARTITIONS" | grep NTFS | cut -d' ' -f1 | while read x; do
    PARTNUM=$(echo $x | grep -Eo "[0-9]+$")
    ntfsclone -so - $x | diskvault create repo::hostname-part$PARTNUM -
done
# to back up non-NTFS partitions as well:
echo "$PARTITIONS" | grep -v NTFS | cut -d' ' -f1 | while read x; do
    PARTNUM=$(echo $x | grep -Eo "[0-9]+$")
    diskvault create --read-special repo::hostname-part$PARTNUM $x
done
"""

RESTORE = r"""
diskvault extract --stdout repo::hostname-partinfo | dd of=$DISK && partprobe
PARTITIONS=$(sfdisk -lo Device,Type $DISK | sed -e '1,/Device\s*Type/d' | sed -e "$MAP")
diskvault list --format {archive}{NL} repo | grep 'part[0-9]*$' | while read x; do
    PARTNUM=$(echo $x | grep -Eo "[0-9]+$")
    PARTITION=$(echo "$PARTITIONS" | grep -E "$DISKp?$PARTNUM" | head -n1)
    if echo "$PARTITION" | cut -d' ' -f2- | grep -q NTFS; then
        diskvault extract --stdout repo::$x | ntfsclone -rO $(echo "$PARTITION" | cut -d' ' -f1) -
    else
        diskvault extract --stdout repo::$x | dd of=$(echo "$PARTITION" | cut -d' ' -f1)
    fi
done
"""


@pytest.fixture
def seed_env(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "diskvault").write_text(f"#!/bin/sh\nexec {sys.executable} {DV_ENTRY} \"$@\"\n")
    (bindir / "partprobe").write_text("#!/bin/sh\nexit 0\n")
    for f in bindir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bindir}:{env['PATH']}"
    return env


@pytest.fixture
def node_dir():
    """A directory for partition-like device nodes whose path holds no digit."""
    name = "".join(random.choices(string.ascii_lowercase, k=12))
    path = f"/tmp/dvseed-{name}"
    os.mkdir(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sh(script: str, env: dict, cwd: str, strict: bool = True) -> str:
    flags = "-euo" if strict else "-eo"
    r = subprocess.run(["bash", flags, "pipefail", "-c", script], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"script failed ({r.returncode}):\n{script}\n{r.stderr}"
    return r.stdout


@contextlib.contextmanager
def partition_nodes(image: str, disk_dev: str, parts: dict, nodes: str, prefix: str):
    """Loop devices over the partitions, nodes ``{nodes}/{prefix}-pN`` for them, and the
    sed script that puts those names in place of sfdisk's ``{disk_dev}pN``."""
    with contextlib.ExitStack() as stack:
        mapping = []
        for n, p in parts.items():
            dev = stack.enter_context(loop_device(image, p.start, p.size))
            node = f"{nodes}/{prefix}-p{n}"
            os.mknod(node, stat.S_IFBLK | 0o600, os.stat(dev).st_rdev)
            stack.callback(os.unlink, node)
            mapping.append(f"s#^{disk_dev}p{n} #{node} #")
        yield "; ".join(mapping)


def test_seed_ntfsclone_recipe_backup_and_restore(tmp_path, seed_env, node_dir):
    disk = make_disk(tmp_path, "dos", [(1, 1, 16, "ntfs"), (2, 17, 16, "ext4")], 40 * MiB,
                     seed=41)
    work = str(tmp_path)
    dv("init", "-e", "none", "repo", cwd=work)
    with loop_device(disk.path, read_only=True) as DISK, \
            partition_nodes(disk.path, DISK, disk.parts, node_dir, "src") as mapping:
        sh(BACKUP, {**seed_env, "DISK": DISK, "MAP": mapping}, work)
    names = dv("list", "--format", "{archive}{NL}", "repo", cwd=work).stdout.decode().split()
    assert names == ["hostname-partinfo", "hostname-part1", "hostname-part2"]
    info = json.loads(dv("info", "--json", "repo::hostname-part1", cwd=work).stdout)
    assert info["archive"]["items"][0]["source"] == "stdin"  # the ntfsclone stream

    target = str(tmp_path / "target.img")
    random_fill(target, disk.size, 42)
    with loop_device(target) as DISK, \
            partition_nodes(target, DISK, disk.parts, node_dir, "dst") as mapping:
        sh(RESTORE, {**seed_env, "DISK": DISK, "MAP": mapping}, work, strict=False)
    verify_table(target, disk)
    assert sha256_range(target, 0, MiB) == sha256_range(disk.path, 0, MiB)  # the header
    verify_partition(target, disk.parts[1], tmp_path)  # ntfsfix + every file (ntfscat)
    ntfs_3g_files_match(target, disk.parts[1], tmp_path)
    p2 = disk.parts[2]  # dd'd back whole: every byte
    assert sha256_range(target, p2.start, p2.size) == sha256_range(disk.path, p2.start,
                                                                   p2.size)
    verify_partition(target, p2, tmp_path)

    # the one-command equivalent: the NTFS comes back through its block map
    dv("disk", "backup", "repo::hostname-disk", disk.path, cwd=work)
    again = str(tmp_path / "again.img")
    dv("disk", "restore", "repo::hostname-disk", again, cwd=work)
    verify_table(again, disk)
    for part in disk.parts.values():
        verify_partition(again, part, tmp_path)
    items = json.loads(dv("info", "--json", "repo::hostname-disk", cwd=work).stdout)
    part1 = next(i for i in items["archive"]["items"] if i["path"] == "disk/part1")
    assert part1["fs"] == "ntfs" and part1["unused"] > 8 * MiB  # free clusters not read


def ntfs_3g_files_match(image: str, part, tmp_path) -> None:
    """Mount the NTFS read-only with ntfs-3g (FUSE) and compare every file's SHA-256."""
    mnt = tmp_path / "ntfs-mnt"
    mnt.mkdir(exist_ok=True)
    with loop_device(image, part.start, part.size, read_only=True) as dev:
        r = subprocess.run(["ntfs-3g", "-o", "ro", dev, str(mnt)], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        try:
            got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in mnt.iterdir()
                   if p.is_file() and not p.name.startswith("$")}
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    assert got == part.files
