"""Planning a disk restore, in-process: the archive's tiling, the target checks, the plan.

Everything here happens before a byte is written, so every refusal is also checked to
leave the target as it was. The CLI tests (tests/cli/test_disk_backup.py) run the same
paths end to end onto loop devices.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import replace
from types import SimpleNamespace

import pytest
from archive.test_disk_images import (
    MiB,
    assert_only_zeroed,
    build_fs,
    gpt_disk,
    needs_kit,
    random_fill,
    run,
)
from support import allocated, sha256_file

from diskvault.archive.create import CreateOptions
from diskvault.archive.disk import DiskSource, backup_disk, plan_backup
from diskvault.archive.disk_restore import DiskArchive, describe, execute, plan_restore
from diskvault.archive.view import ArchiveView
from diskvault.errors import ArchiveError, IntegrityError, TargetError
from diskvault.repository.repo import Repository
from diskvault.storage.url import open_store

pytestmark = needs_kit


@pytest.fixture(scope="module")
def archived(tmp_path_factory):
    """A repository holding archive "g" of a GPT disk image; yields (repo, disk, archive).

    Shared by the tests of this module: none of them changes the image or the archive.
    """
    tmp_path = tmp_path_factory.mktemp("archived")
    disk = gpt_disk(tmp_path)
    repo = Repository.init(open_store(str(tmp_path / "repo")), "none", lambda _c: "")
    repo.close()
    repo = Repository.open(open_store(str(tmp_path / "repo")), lambda _c: "")
    src = DiskSource.open(disk.path)
    try:
        backup_disk(repo, "g", plan_backup(src), CreateOptions())
    finally:
        src.close()
    try:
        yield repo, disk, DiskArchive.from_view(ArchiveView.open(repo, "g"))
    finally:
        repo.close()


def test_archive_tiling_and_table_round_trip(archived):
    repo, disk, arch = archived
    assert arch.size == disk.size and sum(i.size for i in arch.items) == disk.size
    table = arch.table(repo)
    assert table is not None and table.label == "gpt"
    assert [(p.number, p.start, p.size) for p in table.partitions] == [
        (n, p.start, p.size) for n, p in sorted(disk.parts.items())]
    with pytest.raises(ArchiveError, match="has no partition 9 .partitions: 1, 2, 3, 4"):
        arch.partition_item(9)
    # an item list with a piece missing or resized is damage, not a smaller disk
    fake_meta = {"disk": arch.disk}
    for items in (arch.items[:4] + arch.items[5:],
                  [replace(arch.items[0], size=arch.items[0].size + 1)] + arch.items[1:]):
        view = SimpleNamespace(name="g", meta=fake_meta, items=items, loss=None)
        with pytest.raises(IntegrityError, match="does not continue the disk"):
            DiskArchive.from_view(view)  # type: ignore[arg-type]
    with pytest.raises(ArchiveError, match="is not a disk archive"):
        DiskArchive.from_view(SimpleNamespace(name="x", meta={}, items=[], loss=None))  # type: ignore


def test_plan_for_new_image_and_larger_target(archived, tmp_path):
    repo, disk, arch = archived
    new = plan_restore(repo, arch, str(tmp_path / "new.img"))
    assert new.create and new.final_size == disk.size and not new.gpt_writes
    assert not new.zero_ranges and all(r.write for r in new.regions)
    big = str(tmp_path / "big.img")
    random_fill(big, 80 * MiB, 9)
    plan = plan_restore(repo, arch, big)
    # protective MBR entry, primary header, primary entries, backup entries and header
    assert [off for off, _ in plan.gpt_writes] == [
        446, 512, 1024, 80 * MiB - 33 * 512, 80 * MiB - 512]
    moved = [r.item.path for r in plan.regions if not r.write]
    assert moved == ["disk/table-gpt-backup-entries", "disk/table-gpt-backup-header"]
    assert [(o, n) for o, n, _ in plan.zero_ranges] == [
        (disk.size - 33 * 512, 32 * 512), (disk.size - 512, 512)]
    text = "\n".join(describe(plan, str))
    assert "disk/part1 (ext4)" in text and "zeroed" in text and "backup GPT moved" in text


def test_partition_restore_plan(archived, tmp_path):
    repo, disk, arch = archived
    plan = plan_restore(repo, arch, str(tmp_path / "p2.img"), partition=2)
    assert plan.size == disk.parts[2].size and [r.offset for r in plan.regions] == [0]
    execute(repo, plan)
    p2 = str(tmp_path / "p2.img")
    run("fsck.vfat", "-n", p2)
    got = {n: hashlib.sha256(subprocess.run(["mcopy", "-i", p2, f"::/{n}", "-"],
                                            capture_output=True, check=True).stdout
                             ).hexdigest() for n in disk.parts[2].files}
    assert got == disk.parts[2].files
    with pytest.raises(TargetError, match="holds a vfat filesystem; --force overwrites it"):
        plan_restore(repo, arch, str(tmp_path / "p2.img"), partition=2)
    # a whole disk given as a partition target: its table would be destroyed
    with pytest.raises(TargetError, match="carries a partition table .*a whole disk"):
        plan_restore(repo, arch, disk.path, partition=2)


def _refused(repo, arch, target: str, match: str, **kw) -> None:
    before = sha256_file(target)
    with pytest.raises(TargetError, match=match):
        plan_restore(repo, arch, target, **kw)
    assert sha256_file(target) == before


def test_target_checks(archived, tmp_path):
    repo, disk, arch = archived
    small = str(tmp_path / "small.img")
    random_fill(small, disk.size - MiB, 4)
    _refused(repo, arch, small, r"too small: 66060288 bytes, the disk needs 67108864")
    _refused(repo, arch, small, r"too small", force=True)  # --force never makes room
    other = gpt_disk(tmp_path, seed=7, name="other.img")  # another disk GUID
    _refused(repo, arch, other.path, r"carries another disk's partition table \(gpt, id ")
    assert plan_restore(repo, arch, other.path, force=True).target.table is not None
    same = str(tmp_path / "same.img")
    shutil.copyfile(disk.path, same)  # the disk itself (a roll-back): no --force needed
    assert plan_restore(repo, arch, same).target.table.disk_id == arch.disk["disk_id"]
    bare = str(tmp_path / "bare.img")
    build_fs("ext4", bare, 64 * MiB, tmp_path / "bsrc", 0, 3)
    _refused(repo, arch, bare, r"holds a ext4 filesystem; --force overwrites it")
    damaged = str(tmp_path / "damaged.img")
    random_fill(damaged, 64 * MiB, 5)  # an MBR whose partition runs past the end
    run("sfdisk", "-q", damaged, input="label: dos\n,10MiB,83\n")
    with open(damaged, "r+b") as f:
        f.seek(446 + 12)
        f.write((10 ** 6).to_bytes(4, "little"))
    _refused(repo, arch, damaged, r"holds a damaged partition table \(MBR partition 1 ends")
    with pytest.raises(TargetError, match="neither a block device nor an image"):
        plan_restore(repo, arch, str(tmp_path))


def test_execute_onto_new_image_is_sparse_and_exact_where_used(archived, tmp_path):
    repo, disk, arch = archived
    out = str(tmp_path / "restored.img")
    result = execute(repo, plan_restore(repo, arch, out))
    assert result.written + result.blank == disk.size
    p = disk.parts[4]  # raw data comes back exactly
    with open(out, "rb") as f:
        f.seek(p.start)
        assert hashlib.sha256(f.read(p.size)).hexdigest() == p.head_sha
    blanked = assert_only_zeroed(disk.path, out, 0, disk.size)
    assert blanked > 10 * MiB  # stale free space came back as zeros...
    assert allocated(out) < disk.size - 10 * MiB  # ...and as holes
    assert run("sfdisk", "--json", out) == run("sfdisk", "--json", disk.path).replace(
        disk.path, out)
