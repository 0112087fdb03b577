"""Real partitioned disk images for the whole-disk tests, and the backup plan made of them.

The builders (imported by tests/cli/test_disk_backup.py and test_seed_ntfs.py as
``archive.test_disk_images``) make GPT and MBR images whose every byte starts random —
stale data, as on a used disk — and whose partitions hold real filesystems made by the
real tools (mke2fs -d, mkfs.vfat + mcopy, mkntfs + ntfscp, mkswap) with known files.
The verifiers check a restored image the way a user would: sfdisk/sgdisk, fsck, files'
SHA-256 after a read-only mount (or mtools/ntfscat), raw bytes where nothing is free.
The tests here check the plan ``disk backup`` makes from such images, in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from support import have_tool, loop_device, needs_loop, needs_tool

from diskvault.archive.disk import DiskSource, plan_backup
from diskvault.errors import DiskError

MiB = 1 << 20
SECTOR = 512
# GPT type GUIDs / MBR ids sfdisk accepts
TYPES = {"gpt": {"ext4": "L", "vfat": "U", "swap": "S", "ntfs": "EBD0A0A2-B9E5-4433-87C0-"
                 "68B6B72699C7", None: "8DA63339-0007-60C0-C436-083AC8230908"},
         "dos": {"ext4": "83", "vfat": "c", "swap": "82", "ntfs": "7", None: "da"}}


@dataclass
class Part:
    number: int
    start: int
    size: int
    fs: str | None  # ext4, vfat, ntfs, swap, or None: raw random data
    files: dict[str, str] = field(default_factory=dict)  # name → SHA-256
    head_sha: str = ""  # SHA-256 of the bytes that must come back exactly (raw, swap header)
    head_len: int = 0


@dataclass
class Disk:
    path: str
    label: str
    size: int
    parts: dict[int, Part]
    ext_start: int = 0  # MBR extended container, if any
    ext_size: int = 0


def run(*cmd: str, input: str | None = None) -> str:
    r = subprocess.run(cmd, input=input, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}): {r.stdout}{r.stderr}"
    return r.stdout


def random_fill(path: str, size: int, seed: int) -> None:
    with open(path, "wb") as f:
        f.write(random.Random(seed).randbytes(size))


def make_files(root: Path, seed: int, count: int = 6, max_size: int = 300_000
               ) -> dict[str, str]:
    """Files half random, half text (compressible), with their SHA-256."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    sums = {}
    for i in range(count):
        n = rng.randrange(1000, max_size)
        data = rng.randbytes(n // 2) + (f"line {i} of seed {seed}\n".encode() * n)[: n - n // 2]
        (root / f"file{i}.bin").write_bytes(data)
        sums[f"file{i}.bin"] = hashlib.sha256(data).hexdigest()
    return sums


def build_fs(kind: str | None, image: str, size: int, src: Path, start: int, seed: int
             ) -> tuple[dict[str, str], int]:
    """Make a filesystem in ``image`` (random-filled); return its files and exact bytes."""
    random_fill(image, size, seed)
    if kind is None:
        return {}, size
    if kind == "swap":
        run("mkswap", "-q", image)
        return {}, 4096
    files = make_files(src, seed)
    if kind == "ext4":
        run("mke2fs", "-q", "-F", "-t", "ext4", "-E", "nodiscard", "-d", str(src), image)
    elif kind == "vfat":
        run("mkfs.vfat", "-F", "16", "-n", "DVTEST", image)
        run("mcopy", "-i", image, *[str(src / n) for n in sorted(files)], "::/")
    elif kind == "ntfs":
        run("mkntfs", "-F", "-Q", "-q", "-p", str(start // SECTOR), "-H", "255", "-S", "63",
            image)
        for n in sorted(files):
            run("ntfscp", "-q", image, str(src / n), f"/{n}")
    else:
        raise ValueError(kind)
    return files, 0


def make_disk(tmp: Path, label: str, spec: list[tuple[int, int, int, str | None]],
              size: int, seed: int = 1, name: str = "disk.img",
              extended: tuple[int, int, int] | None = None) -> Disk:
    """A random-filled image partitioned by sfdisk: spec = (number, start MiB, MiB, fs).

    ``extended`` = (number, start MiB, MiB) adds an MBR extended container; partitions
    numbered 5+ are its logical partitions (sfdisk writes their EBRs).
    """
    path = str(tmp / name)
    random_fill(path, size, seed)
    lines = [f"label: {label}"]
    if extended:
        n, s, m = extended
        lines.append(f"{path}{n} : start={s * MiB // SECTOR}, size={m * MiB // SECTOR}, type=5")
    lines += [f"{path}{n} : start={s * MiB // SECTOR}, size={m * MiB // SECTOR}, "
              f"type={TYPES[label][fs]}" for n, s, m, fs in spec]
    run("sfdisk", "-q", "--no-reread", "--no-tell-kernel", path, input="\n".join(lines) + "\n")
    disk = Disk(path, label, size, {})
    if extended:
        disk.ext_start, disk.ext_size = extended[1] * MiB, extended[2] * MiB
    for n, s, m, fs in spec:
        part = Part(n, s * MiB, m * MiB, fs)
        fsimg = str(tmp / f"fs{n}.img")
        part.files, part.head_len = build_fs(fs, fsimg, part.size, tmp / f"src{n}", part.start,
                                             seed * 100 + n)
        with open(fsimg, "rb") as f:
            data = f.read()
        part.head_sha = hashlib.sha256(data[: part.head_len]).hexdigest()
        with open(path, "r+b") as f:
            f.seek(part.start)
            f.write(data)
        os.unlink(fsimg)
        disk.parts[n] = part
    return disk


# a 64 MiB GPT disk: ext4, FAT16, swap, raw data (and a 1 MiB gap before the backup GPT)
GPT_SPEC = [(1, 1, 24, "ext4"), (2, 25, 14, "vfat"), (3, 39, 4, "swap"), (4, 43, 20, None)]
# a 64 MiB MBR disk: ext4, an extended container holding FAT, NTFS and raw logicals,
# and a primary swap partition after the container
MBR_SPEC = [(1, 1, 16, "ext4"), (3, 57, 4, "swap"), (5, 18, 10, "vfat"),
            (6, 29, 12, "ntfs"), (7, 42, 6, None)]
MBR_EXTENDED = (2, 17, 40)


def gpt_disk(tmp: Path, seed: int = 1, name: str = "gpt.img") -> Disk:
    return make_disk(tmp, "gpt", GPT_SPEC, 64 * MiB, seed, name)


def mbr_disk(tmp: Path, seed: int = 2, name: str = "mbr.img") -> Disk:
    return make_disk(tmp, "dos", MBR_SPEC, 64 * MiB, seed, name, MBR_EXTENDED)


def sha256_range(path: str, start: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = size
        while left:
            b = f.read(min(left, 4 * MiB))
            assert b, f"{path} ends before byte {start + size}"
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def sfdisk_json(path: str) -> dict:
    return json.loads(run("sfdisk", "--json", path))["partitiontable"]


def partitions_of(path: str) -> list[tuple[int, int, int, str]]:
    """(number, start byte, size, type) of each partition, as sfdisk reads them."""
    pt = sfdisk_json(path)
    out = []
    for p in pt["partitions"]:
        num = int("".join(c for c in p["node"][len(path):] if c.isdigit()) or p["node"][-1])
        out.append((num, p["start"] * SECTOR, p["size"] * SECTOR, p["type"]))
    return sorted(out)


# --- verifying a restored disk --------------------------------------------------------


def verify_table(restored: str, original: Disk) -> None:
    """sfdisk (and for GPT sgdisk) accept the table; partitions sit where they were."""
    run("sfdisk", "-V", restored)
    if original.label == "gpt":
        out = run("sgdisk", "-v", restored)
        assert "No problems found" in out, out
    assert partitions_of(restored) == partitions_of(original.path)


def verify_partition(image: str, part: Part, tmp: Path, base: int | None = None) -> None:
    """fsck and every file's SHA-256 (or the exact bytes) of one partition in ``image``."""
    start = part.start if base is None else base
    if not part.fs or part.fs == "swap":
        assert sha256_range(image, start, part.head_len) == part.head_sha, part
        return
    with loop_device(image, start, part.size, read_only=True) as dev:
        if part.fs == "ext4":
            run("e2fsck", "-fn", dev)
            mnt = tmp / f"mnt{part.number}-{random.randrange(1 << 30)}"
            mnt.mkdir()
            run("mount", "-o", "ro", dev, str(mnt))
            try:
                got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                       for p in mnt.iterdir() if p.is_file()}
            finally:
                subprocess.run(["umount", str(mnt)], check=False)
        elif part.fs == "vfat":
            run("fsck.vfat", "-n", dev)
            names = run("mdir", "-b", "-i", dev, "::/").split()
            got = {n.rsplit("/", 1)[-1].lower(): _sha_of_cmd(["mcopy", "-n", "-i", dev, n, "-"])
                   for n in names}
        elif part.fs == "ntfs":
            run("ntfsfix", "-n", dev)
            got = {n: _sha_of_cmd(["ntfscat", dev, f"/{n}"]) for n in part.files}
        else:
            raise ValueError(part.fs)
    assert got == part.files, f"partition {part.number} ({part.fs}): files differ"


def _sha_of_cmd(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True)
    assert r.returncode == 0, r.stderr
    return hashlib.sha256(r.stdout).hexdigest()


def verify_disk(restored: str, original: Disk, tmp: Path) -> None:
    verify_table(restored, original)
    for part in original.parts.values():
        verify_partition(restored, part, tmp)


def assert_only_zeroed(original: str, restored: str, start: int, size: int) -> int:
    """Every sector of the range is identical or all zero in ``restored``: a restore may
    blank free space (1 KiB ext blocks, 512-byte FAT sectors), never alter a byte.
    Returns how many bytes were blanked."""
    a = np.fromfile(original, np.uint8, size, offset=start).reshape(-1, SECTOR)
    b = np.fromfile(restored, np.uint8, size, offset=start).reshape(-1, SECTOR)
    same = (a == b).all(axis=1)
    blank = ~b.any(axis=1)
    assert (same | blank).all(), f"blocks altered: {np.flatnonzero(~(same | blank))[:10]}"
    return int((~same & blank).sum()) * SECTOR


KIT = ("sfdisk", "mke2fs", "mkfs.vfat", "mcopy", "mkntfs", "ntfscp", "mkswap")
needs_kit = needs_tool(*KIT)


# --- the backup plan of such disks (no repository, no loop devices) -------------------


def _plan(path: str):
    src = DiskSource.open(path)
    try:
        return plan_backup(src)
    finally:
        src.close()


@pytest.fixture(scope="module")
def gpt_image(tmp_path_factory) -> Disk:
    return gpt_disk(tmp_path_factory.mktemp("gpt"))


@needs_kit
def test_gpt_plan_tiles_the_disk_with_table_partitions_and_gaps(gpt_image):
    disk = gpt_image
    plan = _plan(disk.path)
    items = [p.item for p in plan.items]
    assert [i.path for i in items] == [
        "disk/table-mbr", "disk/table-gpt-header", "disk/table-gpt-entries",
        "disk/gap-17408", "disk/part1", "disk/part2", "disk/part3", "disk/part4",
        f"disk/gap-{63 * MiB}", "disk/table-gpt-backup-entries", "disk/table-gpt-backup-header"]
    pos = 0
    for i in items:  # no hole, no overlap, in disk order
        assert i.disk_offset == pos
        pos += i.size
    assert pos == disk.size
    parts = {i.partition: i for i in items if i.partition}
    assert {n: (i.fs, i.source, i.disk_offset, i.size) for n, i in parts.items()} == {
        n: ("swap" if p.fs == "swap" else p.fs, "partition", p.start, p.size)
        for n, p in disk.parts.items()}
    maps = {p.item.partition: p.content.blockmap for p in plan.items if p.item.partition}
    # ext4, FAT and swap have free space to skip; raw data is read whole, and says why
    assert all(maps[n] is not None and not maps[n].is_all_used for n in (1, 2, 3))
    assert maps[4] is None and "unknown filesystem" in parts[4].note
    assert maps[3].used_bytes() == 4096  # swap: only its header page
    meta = plan.disk_meta()
    pt = sfdisk_json(disk.path)
    assert (meta["label"], meta["disk_id"], meta["size"], meta["sector_size"]) == (
        "gpt", pt["id"], disk.size, 512)
    assert [(p["number"], p["start"], p["size"], p["type"], p["uuid"]) for p in
            meta["partitions"]] == [(int(q["node"][-1]), q["start"] * 512, q["size"] * 512,
                                     q["type"], q["uuid"]) for q in pt["partitions"]]
    assert [r["what"] for r in meta["regions"]] == [
        "mbr", "gpt-header", "gpt-entries", "gpt-backup-entries", "gpt-backup-header"]
    assert plan.warnings == []


@needs_kit
def test_mbr_plan_has_ebrs_as_table_items_and_no_container_item(tmp_path):
    disk = mbr_disk(tmp_path)
    plan = _plan(disk.path)
    items = [p.item for p in plan.items]
    assert all(i.partition != 2 for i in items)  # the container is not backed up twice
    ebrs = [i for i in items if i.path.startswith("disk/table-ebr-")]
    assert len(ebrs) == 3 and all(i.size == 512 and i.source == "table" for i in ebrs)
    assert ebrs[0].disk_offset == disk.ext_start  # the first EBR opens the container
    inside = [i for i in items if disk.ext_start <= i.disk_offset < disk.ext_start
              + disk.ext_size]
    assert {i.source for i in inside} == {"table", "partition", "gap"}
    assert sum(i.size for i in inside) == disk.ext_size
    assert [i.partition for i in items if i.partition] == [1, 5, 6, 7, 3]  # disk order
    assert {i.partition: i.fs for i in items if i.partition} == {
        1: "ext4", 5: "vfat", 6: "ntfs", 7: None, 3: "swap"}
    meta = plan.disk_meta()
    assert [(p["number"], p["kind"]) for p in meta["partitions"]] == [
        (1, "primary"), (2, "extended"), (3, "primary"), (5, "logical"), (6, "logical"),
        (7, "logical")]
    assert meta["disk_id"] == sfdisk_json(disk.path)["id"]


def test_bare_filesystem_is_one_whole_item_with_its_block_map(tmp_path):
    if not have_tool("mke2fs"):
        pytest.skip("needs mke2fs")
    image = str(tmp_path / "bare.img")
    build_fs("ext4", image, 16 * MiB, tmp_path / "src", 0, 5)
    plan = _plan(image)
    (p,) = plan.items
    assert (p.item.path, p.item.source, p.item.fs, p.item.disk_offset) == (
        "disk/whole", "disk", "ext4", 0)
    assert p.content.blockmap is not None and not p.content.blockmap.is_all_used
    assert plan.disk_meta()["label"] is None and plan.disk_meta()["partitions"] == []


@needs_kit
def test_no_skip_unused_reads_everything_but_names_the_filesystem(gpt_image):
    src = DiskSource.open(gpt_image.path)
    try:
        plan = plan_backup(src, skip_unused=False)
    finally:
        src.close()
    assert all(p.content.blockmap is None for p in plan.items)
    part1 = next(p.item for p in plan.items if p.item.partition == 1)
    assert part1.fs == "ext4" and part1.note == "--no-skip-unused: all blocks read"


@pytest.mark.parametrize("damage", ["both-gpt-headers", "truncated"])
def test_damaged_or_truncated_table_is_an_error_before_any_read(tmp_path, damage):
    if not have_tool("sfdisk"):
        pytest.skip("needs sfdisk")
    path = str(tmp_path / "d.img")
    random_fill(path, 8 * MiB, 3)
    run("sfdisk", "-q", path, input="label: gpt\n,2MiB,L\n,,L\n")
    with open(path, "r+b") as f:
        if damage == "truncated":
            f.truncate(6 * MiB)
        else:
            for off in (512 + 20, 8 * MiB - 512 + 20):  # flip a byte in each header
                f.seek(off)
                b = f.read(1)
                f.seek(off)
                f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(DiskError, match=r"d\.img: partition table: .*"
                       + ("truncated" if damage == "truncated" else "CRC")):
        _plan(path)


@needs_loop
@needs_kit
def test_builders_make_what_the_verifiers_accept(tmp_path):
    """The verifiers must pass on the originals and catch a changed file byte."""
    disk = mbr_disk(tmp_path)
    verify_disk(disk.path, disk, tmp_path)
    broken = str(tmp_path / "broken.img")
    shutil.copyfile(disk.path, broken)
    part = disk.parts[7]  # raw data: one flipped byte must be caught
    with open(broken, "r+b") as f:
        f.seek(part.start + 12345)
        b = f.read(1)
        f.seek(part.start + 12345)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(AssertionError):
        verify_partition(broken, part, tmp_path)
    with pytest.raises(AssertionError, match="altered"):
        assert_only_zeroed(disk.path, broken, 0, disk.size)

