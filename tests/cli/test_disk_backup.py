"""`disk backup` / `disk restore`, run as a user would, on real GPT and MBR disks.

The disks (tests/archive/test_disk_images.py) hold ext4, FAT, NTFS, swap and raw data,
with every free byte random. Restores are checked with sfdisk/sgdisk, fsck, files'
SHA-256 after a read-only mount (mtools/ntfscat for FAT/NTFS), exact bytes for raw
data and table structures, and "every sector identical or blank" for the rest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from archive.test_disk_images import (
    Disk,
    MiB,
    assert_only_zeroed,
    build_fs,
    gpt_disk,
    make_disk,
    mbr_disk,
    needs_kit,
    partitions_of,
    random_fill,
    run,
    sha256_range,
    verify_disk,
    verify_partition,
)
from support import DV_ENTRY, dv, init_repo, loop_device, needs_loop, needs_tool, sha256_file

pytestmark = [needs_kit, needs_tool("sgdisk", "e2fsck", "fsck.vfat", "ntfsfix", "ntfscat")]


@pytest.fixture(scope="module")
def gpt(tmp_path_factory) -> Disk:
    """The GPT disk, shared: tests that change it work on a copy."""
    return gpt_disk(tmp_path_factory.mktemp("gpt"))


def backup_json(*args: str) -> dict:
    return json.loads(dv("disk", "backup", "--json", *args).stdout)


def items_by_path(j: dict) -> dict[str, dict]:
    return {i["path"]: i for i in j["archive"]["items"]}


def refused(*args: str, match: str, unchanged: str | None = None, rc: int = 2) -> str:
    """Run a command that must fail with one error line, leaving ``unchanged`` as it was."""
    before = sha256_file(unchanged) if unchanged and os.path.exists(unchanged) else None
    r = dv(*args, check=False)
    err = r.stderr.decode()
    assert r.returncode == rc, (r.returncode, err)
    assert err.count("\n") == 1 and err.startswith("diskvault: error: "), err
    assert match in err, err
    if unchanged:
        assert (sha256_file(unchanged) if os.path.exists(unchanged) else None) == before
    return err


# --- the whole round trip ------------------------------------------------------------


@needs_loop
def test_gpt_disk_from_loop_onto_larger_loop_new_image_and_dd(gpt, tmp_path):
    repo = str(tmp_path / "repo")
    init_repo(repo)
    with loop_device(gpt.path, read_only=True) as dev:
        j = backup_json(f"{repo}::g1", dev)
    stats, items, meta = j["archive"]["stats"], items_by_path(j), j["archive"]["disk"]
    assert (meta["kind"], meta["backing_file"], meta["label"]) == ("blockdev", gpt.path, "gpt")
    assert items["disk/part1"]["fs"] == "ext4" and items["disk/part1"]["unused"] > 15 * MiB
    assert items["disk/part2"]["fs"] == "vfat" and items["disk/part2"]["unused"] > 8 * MiB
    assert items["disk/part3"]["unused"] == 4 * MiB - 4096  # swap: its header only
    assert items["disk/part4"]["read"] == 20 * MiB  # raw data is read whole
    assert stats["read"] + stats["unused"] == gpt.size and stats["unused"] > 27 * MiB

    # onto a larger loop device full of old data: the GPT grows to the new end
    big = str(tmp_path / "big.img")
    random_fill(big, 96 * MiB, 11)
    with loop_device(big) as target:
        dv("disk", "restore", f"{repo}::g1", target)
    verify_disk(big, gpt, tmp_path)
    assert json.loads(run("sfdisk", "--json", big))["partitiontable"]["lastlba"] \
        == 96 * MiB // 512 - 34
    assert_only_zeroed(gpt.path, big, MiB, 62 * MiB)  # all partitions

    # onto a new image file: created sparse, same size, same table bytes
    new = str(tmp_path / "new.img")
    dv("disk", "restore", f"{repo}::g1", new)
    verify_disk(new, gpt, tmp_path)
    assert os.path.getsize(new) == gpt.size and os.stat(new).st_blocks * 512 < 40 * MiB
    assert assert_only_zeroed(gpt.path, new, 0, gpt.size) > 27 * MiB

    # the seed's way: extract --stdout | dd of=$DISK gives the same disk
    same = str(tmp_path / "dd.img")
    random_fill(same, 64 * MiB, 12)
    with loop_device(same) as target:
        subprocess.run(f"{sys.executable} {DV_ENTRY} extract --stdout {repo}::g1 "
                       f"| dd of={target} bs=4M status=none", shell=True, check=True)
    assert sha256_file(same) == sha256_file(new)

    info = dv("info", f"{repo}::g1").stdout.decode()
    assert "Disk: /dev/loop" in info and "table gpt" in info
    line = next(x for x in info.splitlines() if "disk/part1 (ext4)" in x)
    assert "skipped as unused" in line and "dedup" in line and "stored" in line


@needs_loop
def test_mbr_disk_with_logical_partitions_from_image_and_single_partitions(tmp_path):
    mbr = mbr_disk(tmp_path)
    repo = str(tmp_path / "repo")
    init_repo(repo)
    out = dv("disk", "backup", "--stats", f"{repo}::m", mbr.path).stdout.decode()
    for n, fs in ((1, "ext4"), (5, "vfat"), (6, "ntfs"), (3, "swap")):
        assert f"disk/part{n} ({fs}): total" in out, out
    assert "disk/part7 (no known filesystem)" in out and "partition table and gaps" in out

    target = str(tmp_path / "target.img")  # an existing image of the same size
    random_fill(target, mbr.size, 13)
    dv("disk", "restore", f"{repo}::m", target)
    verify_disk(target, mbr, tmp_path)
    for start, size in outside_partitions(mbr):  # MBR, EBR chain and small gaps: exact
        if size > MiB:  # unpartitioned space (not stored by default): zeroed
            assert sha256_range(target, start, size) == sha256_range("/dev/zero", 0, size)
        else:
            assert sha256_range(target, start, size) == sha256_range(mbr.path, start, size)
    assert_only_zeroed(mbr.path, target, 0, mbr.size)

    # one partition onto a new file, and one onto a block device of another size
    p6 = str(tmp_path / "p6.img")
    dv("disk", "restore", "--partition", "6", f"{repo}::m", p6)
    assert os.path.getsize(p6) == mbr.parts[6].size
    verify_partition(p6, mbr.parts[6], tmp_path, base=0)
    spare = str(tmp_path / "spare.img")
    random_fill(spare, 20 * MiB, 14)
    with loop_device(spare) as dev:
        dv("disk", "restore", "--partition", "1", f"{repo}::m", dev)
    verify_partition(spare, mbr.parts[1], tmp_path, base=0)
    refused("disk", "restore", "--partition", "2", f"{repo}::m", str(tmp_path / "x.img"),
            match="has no partition 2 (partitions: 1, 5, 6, 7, 3)")
    assert not os.path.exists(tmp_path / "x.img")


def outside_partitions(disk: Disk) -> list[tuple[int, int]]:
    """Byte ranges not inside a data partition: table structures (EBRs too) and gaps."""
    out, pos = [], 0
    for p in sorted(disk.parts.values(), key=lambda p: p.start):
        if p.start > pos:
            out.append((pos, p.start - pos))
        pos = p.start + p.size
    return out + ([(pos, disk.size - pos)] if pos < disk.size else [])


# --- a second backup ---------------------------------------------------------------------


@needs_loop
def test_second_backup_after_changing_a_few_files_stores_little(gpt, tmp_path):
    work = str(tmp_path / "work.img")
    shutil.copyfile(gpt.path, work)
    repo = str(tmp_path / "repo")
    init_repo(repo)
    first = backup_json(f"{repo}::day1", work)["archive"]["stats"]
    part = gpt.parts[1]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_device(work, part.start, part.size) as dev:
        run("mount", dev, str(mnt))
        try:
            with open(mnt / "file0.bin", "r+b") as f:
                f.write(random.randbytes(50_000))
            (mnt / "new.bin").write_bytes(random.randbytes(100_000))
            (mnt / "file3.bin").unlink()
        finally:
            run("umount", str(mnt))
    second = backup_json(f"{repo}::day2", work)
    stats = second["archive"]["stats"]
    fraction = stats["new_stored"] / first["new_stored"]
    print(f"second backup stored {stats['new_stored']} of {first['new_stored']} bytes "
          f"({fraction:.1%})")
    # 150 kB of file changes plus ext4 metadata touch at most a few 4 MiB chunks
    assert fraction < 0.15
    assert [i["path"] for i in second["archive"]["items"] if i["stored"]] == ["disk/part1"]
    restored = str(tmp_path / "day2.img")
    dv("disk", "restore", f"{repo}::day2", restored)
    with loop_device(restored, part.start, part.size, read_only=True) as dev:
        run("e2fsck", "-fn", dev)
        run("mount", "-o", "ro", dev, str(mnt))
        try:
            names = sorted(p.name for p in mnt.iterdir() if p.is_file())
            changed = (mnt / "file0.bin").read_bytes()
        finally:
            run("umount", str(mnt))
    assert "new.bin" in names and "file3.bin" not in names
    with loop_device(work, part.start, part.size, read_only=True) as dev:
        run("mount", "-o", "ro", dev, str(mnt))
        try:
            assert (mnt / "file0.bin").read_bytes() == changed
        finally:
            run("umount", str(mnt))


# --- a crash-consistent copy of a mounted ext4 ------------------------------------------


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@needs_loop
def test_dirty_ext4_loses_no_file_after_restore_and_journal_replay(tmp_path):
    """A copy of a disk taken while its ext4 was mounted: the bitmaps that say which
    blocks are used are only in the journal. Restore + replay must keep every file."""
    disk = make_disk(tmp_path, "gpt", [(1, 1, 40, None)], 48 * MiB, seed=21)
    part = disk.parts[1]
    live = disk.path
    with loop_device(live, part.start, part.size) as dev:
        run("mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-E", "nodiscard", dev)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        run("mount", dev, str(mnt))
        try:
            rng = random.Random(5)
            old = [mnt / f"old{i}" for i in range(6)]
            for p in old:
                _write_synced(p, rng.randbytes(rng.randrange(1, MiB)))
            run("sync", "-f", str(mnt))
            for i in range(30):
                _write_synced(mnt / f"f{i}", rng.randbytes(rng.randrange(1, 600_000)))
            for p in old[::2]:
                p.unlink()
            _write_synced(mnt / "last", b"x" * 5000)
            dirty = str(tmp_path / "dirty.img")
            shutil.copyfile(live, dirty)  # crash-consistent: journal not checkpointed
            want = {p.name: sha256_file(str(p)) for p in mnt.iterdir() if p.is_file()}
        finally:
            run("umount", str(mnt))
    with loop_device(dirty, part.start, part.size, read_only=True) as dev:
        assert "needs_recovery" in run("dumpe2fs", "-h", dev)  # the premise
    repo = str(tmp_path / "repo")
    init_repo(repo)
    j = backup_json(f"{repo}::dirty", dirty)
    item = items_by_path(j)["disk/part1"]
    print(f"dirty ext4: read {item['read']}, unused {item['unused']}: {item['note']}")
    assert "journal" in (item["note"] or "")  # the map took the journal into account
    restored = str(tmp_path / "restored.img")
    dv("disk", "restore", f"{repo}::dirty", restored)
    with loop_device(restored, part.start, part.size) as dev:
        r = subprocess.run(["e2fsck", "-fy", dev], capture_output=True, text=True)
        assert r.returncode in (0, 1), r.stdout + r.stderr  # 1: the journal was replayed
        run("e2fsck", "-fn", dev)
        run("mount", "-o", "ro", dev, str(mnt))
        try:
            got = {p.name: sha256_file(str(p)) for p in mnt.iterdir() if p.is_file()}
        finally:
            run("umount", str(mnt))
    assert got == want and len(want) == 31 + 3


# --- a mounted source, --serial, --skip-unused ---------------------------------------------


@needs_loop
def test_mounted_partition_is_read_whole_with_a_warning(gpt, tmp_path):
    work = str(tmp_path / "work.img")
    shutil.copyfile(gpt.path, work)
    repo = str(tmp_path / "repo")
    init_repo(repo)
    part = gpt.parts[1]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_device(work, part.start, part.size) as dev:
        for opts, rc in (("ro", 0), ("rw", 1)):
            # noinit_itable: ext4 would zero uninitialised inode tables in the background
            # after a rw mount, racing the read (and the test's exact byte counts)
            run("mount", "-o", opts if opts == "ro" else "rw,noinit_itable", dev, str(mnt))
            try:
                r = dv("disk", "backup", "--json", f"{repo}::{opts}", work, check=False)
            finally:
                run("umount", str(mnt))
            err = r.stderr.decode()
            assert r.returncode == rc, err
            item = items_by_path(json.loads(r.stdout))["disk/part1"]
            if opts == "ro":  # a read-only mount does not change: the map is used
                assert err == "" and item["unused"] > 15 * MiB
                continue
            # nothing skipped as unused: every byte read, or a hole of the image file (the
            # rw mount's own writes, flushed when the kernel pleases, fill some holes)
            assert item["unused"] == 0
            assert item["read"] <= part.size <= item["read"] + item["zero"]
            assert "in use read-write" in item["note"] and str(mnt) in item["note"]
            lines = err.splitlines()
            assert lines[0].startswith("diskvault: warning: ") and "disk/part1" in lines[0]
            assert lines[-1].startswith("diskvault: warning: 1 warning(s)")


def _fake_sysfs(root: Path, disks: dict[str, tuple[str, str]]) -> str:
    """A /sys/block with one entry per (device node, serial): numbers from real nodes."""
    for name, (node, serial) in disks.items():
        rdev = os.stat(node).st_rdev if os.path.exists(node) else os.makedev(8, 0)
        d = root / "block" / name
        (d / "device").mkdir(parents=True)
        (d / "dev").write_text(f"{os.major(rdev)}:{os.minor(rdev)}\n")
        (d / "size").write_text(f"{(64 * MiB) // 512}\n")
        (d / "device" / "serial").write_text(serial + "\n")
        (d / "device" / "model").write_text("DV TEST DISK\n")
    return str(root)


@needs_loop
def test_serial_selects_the_disk_and_refuses_to_guess(gpt, tmp_path, monkeypatch):
    repo = str(tmp_path / "repo")
    init_repo(repo)
    with loop_device(gpt.path, read_only=True) as dev, \
            loop_device(gpt.path, read_only=True) as dev2:
        monkeypatch.setenv("DISKVAULT_SYSFS_ROOT", _fake_sysfs(tmp_path / "sys", {
            "sdx": (dev, "7VS0224F"), "sdy": (dev2, "TWIN"), "sdz": (dev2, "TWIN")}))
        meta = backup_json("--serial", "7VS0224F", f"{repo}::s")["archive"]["disk"]
        assert (meta["path"], meta["serial"], meta["model"]) == (dev, "7VS0224F",
                                                                "DV TEST DISK")
        refused("disk", "backup", "--serial", "NOPE", f"{repo}::x",
                match="no disk has serial 'NOPE'")
        refused("disk", "backup", "--serial", "TWIN", f"{repo}::x",
                match="serial 'TWIN' matches 2 disks")
        refused("disk", "backup", "--serial", "TWIN", f"{repo}::x", dev,
                match="either --serial or a DEVICE")
    listing = dv("list", "--format", "{archive}{NL}", repo).stdout.decode().split()
    assert listing == ["s"]  # nothing was stored by the refused commands


@needs_loop
def test_create_skip_unused_on_a_filesystem_image(tmp_path):
    fs = str(tmp_path / "fs.img")
    files = build_fs("ext4", fs, 24 * MiB, tmp_path / "src", 0, 31)[0]
    repo = str(tmp_path / "repo")
    init_repo(repo)
    dv("create", "--skip-unused", f"{repo}::skip", fs)
    dv("create", f"{repo}::all", fs)
    (skip,) = json.loads(dv("info", "--json", f"{repo}::skip").stdout)["archive"]["items"]
    (full,) = json.loads(dv("info", "--json", f"{repo}::all").stdout)["archive"]["items"]
    assert skip["fs"] == "ext4" and skip["unused"] > 15 * MiB and skip["read"] < 9 * MiB
    assert full["unused"] == 0 and full["fs"] is None
    out = tmp_path / "out"
    out.mkdir()
    dv("extract", f"{repo}::skip", cwd=str(out))
    extracted = str(out / fs.lstrip("/"))
    assert_only_zeroed(fs, extracted, 0, 24 * MiB)
    run("e2fsck", "-fn", extracted)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_device(extracted, read_only=True) as dev:
        run("mount", "-o", "ro", dev, str(mnt))
        try:
            got = {p.name: sha256_file(str(p)) for p in mnt.iterdir() if p.is_file()}
        finally:
            run("umount", str(mnt))
    assert got == files


# --- refusals: one line, nothing written ---------------------------------------------------


@needs_loop
def test_restore_refuses_before_writing_a_byte(gpt, tmp_path):
    repo = str(tmp_path / "repo")
    init_repo(repo)
    dv("disk", "backup", f"{repo}::g", gpt.path)
    loc = f"{repo}::g"
    small = str(tmp_path / "small.img")
    random_fill(small, 60 * MiB, 1)
    refused("disk", "restore", loc, small, match="is too small: 62914560 bytes",
            unchanged=small)
    other = gpt_disk(tmp_path, seed=3, name="other.img")
    refused("disk", "restore", loc, other.path, unchanged=other.path,
            match="carries another disk's partition table (gpt, id ")
    bare = str(tmp_path / "bare.img")
    build_fs("ext4", bare, 64 * MiB, tmp_path / "bsrc", 0, 2)
    refused("disk", "restore", loc, bare, match="holds a ext4 filesystem; --force overwrites",
            unchanged=bare)
    damaged = str(tmp_path / "damaged.img")
    shutil.copyfile(other.path, damaged)
    with open(damaged, "r+b") as f:  # a GPT whose both headers fail their CRC
        for off in (512 + 24, 64 * MiB - 512 + 24):
            f.seek(off)
            f.write(b"\xde\xad")
    refused("disk", "restore", loc, damaged, match="holds a damaged partition table",
            unchanged=damaged)
    # mounted (read-only even): refused, also with --force
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_device(bare) as dev:
        run("mount", "-o", "ro", dev, str(mnt))
        try:
            for target in (bare, dev):
                refused("disk", "restore", "--force", loc, target,
                        match="is in use (mounted or swap)", unchanged=bare)
        finally:
            run("umount", str(mnt))
    # --dry-run: the plan, and nothing written or created
    absent = str(tmp_path / "absent.img")
    plan = dv("disk", "restore", "--dry-run", loc, absent).stdout.decode()
    assert "disk/part1 (ext4)" in plan and "holes" in plan and "Nothing written" in plan
    assert not os.path.exists(absent)
    before = sha256_file(other.path)
    plan = dv("disk", "restore", "-n", "--force", loc, other.path).stdout.decode()
    # an existing image: its stale bytes in zero/unused ranges become holes too
    assert "holes (punched)" in plan and "Nothing written" in plan
    assert sha256_file(other.path) == before
    # --force overwrites another disk; the result is our disk
    dv("disk", "restore", "--force", loc, other.path)
    assert sha256_file(other.path) != before
    verify_disk(other.path, gpt, tmp_path)
    assert partitions_of(other.path) == partitions_of(gpt.path)
    dv("create", f"{repo}::plain", bare)
    refused("disk", "restore", f"{repo}::plain", str(tmp_path / "n.img"),
            match="is not a disk archive")


def test_backup_refuses_a_damaged_table_and_stores_nothing(tmp_path):
    img = str(tmp_path / "bad.img")
    random_fill(img, 16 * MiB, 8)
    run("sfdisk", "-q", img, input="label: dos\n,4MiB,L\n,4MiB,L\n")
    with open(img, "r+b") as f:  # partition 2 now overlaps partition 1
        f.seek(446 + 16 + 8)
        f.write((4096).to_bytes(4, "little"))
    repo = str(tmp_path / "repo")
    init_repo(repo)
    refused("disk", "backup", f"{repo}::bad", img, match="partition table: partition 1 "
            "overlaps partition 2")
    with open(img, "r+b") as f:
        f.truncate(2 * MiB)  # truncated: partitions reach past the end
    refused("disk", "backup", f"{repo}::bad", img, match="past the end of the disk")
    refused("disk", "backup", f"{repo}::bad", str(tmp_path / "missing.img"),
            match="missing.img: cannot open: No such file")
    refused("disk", "backup", f"{repo}::bad", match="give --serial SERIAL or a DEVICE")
    assert dv("list", "--format", "{archive}{NL}", repo).stdout == b""
