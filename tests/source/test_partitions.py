"""Partition tables: parsed against sfdisk's own reading, damaged in every way we know."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import loop_device, needs_loop, needs_tool

from diskvault.errors import DiskError
from diskvault.source.partitions import (
    PartitionTable,
    layout,
    parse_table,
    read_table,
    relocate_backup_gpt,
)
from diskvault.source.reader import FileRangeReader

pytestmark = needs_tool("sfdisk")
MiB = 1 << 20


def make_image(path, script: str, size: int = 64 * MiB, device: str | None = None) -> str:
    """A sparse image of ``size`` bytes partitioned by ``sfdisk`` (on ``device`` if given)."""
    path = str(path)
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", device or path],
                   input=script, text=True, check=True, capture_output=True)
    return path


def sfdisk_json(target: str) -> dict:
    out = subprocess.run(["sfdisk", "--json", target], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["partitiontable"]


def parse(path: str, sector_size: int | None = None) -> PartitionTable:
    reader = FileRangeReader.open(path)
    try:
        return parse_table(reader, sector_size)
    finally:
        reader.close()


def assert_matches_sfdisk(table: PartitionTable, pt: dict) -> None:
    ss = pt["sectorsize"]
    assert (table.label, table.sector_size) == (pt["label"], ss)
    assert table.disk_id.lower() == pt["id"].lower()
    expected = {int(re.search(r"(\d+)$", p["node"]).group(1)): p for p in pt["partitions"]}
    assert sorted(expected) == sorted(p.number for p in table.partitions)
    for p in table.partitions:
        e = expected[p.number]
        assert (p.start, p.size) == (e["start"] * ss, e["size"] * ss), p
        if table.label == "gpt":
            assert (p.type_id, p.uuid, p.name) == (e["type"], e["uuid"], e.get("name"))
        else:
            assert int(p.type_id, 16) == int(e["type"], 16)
            assert p.bootable == e.get("bootable", False)
    if table.label == "gpt":
        assert (table.gpt.first_usable_lba, table.gpt.last_usable_lba) == (
            pt["firstlba"], pt["lastlba"])


def assert_tiles(table: PartitionTable, image: str | None = None) -> None:
    """layout() covers the disk exactly; table segments hold what their kind says."""
    segs = layout(table)
    pos = 0
    for s in segs:
        assert s.start == pos and s.size > 0, (s, pos)
        pos = s.end
    assert pos == table.disk_size
    for a, b in zip(segs, segs[1:], strict=False):
        assert not (a.kind == "gap" and b.kind == "gap"), "gaps are maximal"
    got = [(s.start, s.size, s.number) for s in segs if s.kind == "partition"]
    assert got == [(p.start, p.size, p.number) for p in table.data_partitions]
    got = sorted((s.start, s.size, s.what) for s in segs if s.kind == "table")
    assert got == sorted((r.start, r.size, r.what) for r in table.regions)
    if image:
        with open(image, "rb") as f:
            for s in segs:
                f.seek(s.start)
                head = f.read(512)
                if s.what in ("mbr", "ebr"):
                    assert head[510:512] == b"\x55\xaa"
                elif s.what.startswith("gpt") and s.what.endswith("header"):
                    assert head[:8] == b"EFI PART"


GPT_SCRIPT = """label: gpt
size=8M, type=L, name="root fs"
size=4M, type=S
start=40M, size=2M, type=U, name="esp"
"""
DOS_SCRIPT = """label: dos
size=8M, type=83, bootable
start=20M, size=30M, type=5
start=21M, size=4M, type=82
start=26M, size=3M, type=83
start=30M, type=7
"""


def test_gpt_matches_sfdisk(tmp_path):
    img = make_image(tmp_path / "g.img", GPT_SCRIPT)
    t = read_table(img)
    assert_matches_sfdisk(t, sfdisk_json(img))
    assert t.notes == []
    assert [p.type_name for p in t.partitions] == ["Linux filesystem", "Linux swap", "EFI System"]
    end = 64 * MiB
    assert [(r.what, r.start, r.size) for r in t.regions] == [
        ("mbr", 0, 512), ("gpt-header", 512, 512), ("gpt-entries", 1024, 16384),
        ("gpt-backup-entries", end - 512 - 16384, 16384), ("gpt-backup-header", end - 512, 512),
    ]
    assert_tiles(t, img)


def test_dos_with_logical_partitions_matches_sfdisk(tmp_path):
    img = make_image(tmp_path / "m.img", DOS_SCRIPT)
    t = read_table(img)
    assert_matches_sfdisk(t, sfdisk_json(img))
    assert [(p.number, p.kind) for p in t.partitions] == [
        (1, "primary"), (2, "extended"), (5, "logical"), (6, "logical"), (7, "logical")]
    ebrs = [r.start for r in t.regions if r.what == "ebr"]
    # the first EBR opens the extended partition; the others sit in front of their logicals
    assert ebrs[0] == 20 * MiB and len(ebrs) == 3
    assert all(any(p.start > e for p in t.partitions if p.kind == "logical") for e in ebrs)
    assert [p.number for p in t.data_partitions] == [1, 5, 6, 7]
    assert_tiles(t, img)
    assert relocate_backup_gpt(t, 128 * MiB) == []


@needs_loop
@pytest.mark.parametrize("label", ["gpt", "dos"])
def test_4096_byte_sectors(tmp_path, label):
    img = str(tmp_path / "g4.img")
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    script = f"label: {label}\nsize=8M, type=L\nsize=4M\nstart=20M, size=1M\n"
    with loop_device_4k(img) as dev:
        make_image(img, script, 64 * MiB, device=dev)
        expected = sfdisk_json(dev)
        assert expected["sectorsize"] == 4096
        via_device = read_table(dev)  # the sector size comes from BLKSSZGET
        assert_matches_sfdisk(via_device, expected)
    assert via_device.regions[0].size == 4096
    if label == "gpt":  # from an image alone the GPT header position tells the sector size
        assert_matches_sfdisk(parse(img), expected)
    else:  # an MBR does not tell: the caller must know
        assert_matches_sfdisk(parse(img, 4096), expected)
    assert_tiles(via_device, img)


def loop_device_4k(img: str):
    import contextlib

    @contextlib.contextmanager
    def cm():
        dev = subprocess.run(["losetup", "-f", "--show", "-b", "4096", img], check=True,
                             capture_output=True, text=True).stdout.strip()
        try:
            yield dev
        finally:
            subprocess.run(["losetup", "-d", dev], check=False)
    return cm()


@needs_loop
def test_read_table_on_a_loop_device(tmp_path):
    img = make_image(tmp_path / "g.img", GPT_SCRIPT)
    with loop_device(img, read_only=True) as dev:
        t = read_table(dev)
        assert_matches_sfdisk(t, sfdisk_json(dev))
    assert t.sector_size == 512 and t.disk_size == 64 * MiB


# --- damage ---------------------------------------------------------------------------


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("where", [512 + 40, 1024 + 32, "wipe"])
def test_damaged_primary_gpt_falls_back_to_backup(tmp_path, where):
    img = make_image(tmp_path / "g.img", GPT_SCRIPT)
    good = read_table(img)
    if where == "wipe":
        with open(img, "r+b") as f:
            f.seek(512)
            f.write(bytes(512))
    else:  # a byte of the header (last usable LBA) or of the first entry
        flip(img, where)
    t = read_table(img)
    assert t.partitions == good.partitions
    assert t.regions == good.regions
    assert len(t.notes) == 1 and "using the backup GPT" in t.notes[0]
    assert_tiles(t)


def test_damaged_backup_gpt_is_noted(tmp_path):
    img = make_image(tmp_path / "g.img", GPT_SCRIPT)
    flip(img, 64 * MiB - 512 + 24)
    t = read_table(img)
    assert len(t.partitions) == 3
    assert any("backup GPT is damaged" in n for n in t.notes)


def test_both_gpts_damaged(tmp_path):
    img = make_image(tmp_path / "g.img", GPT_SCRIPT)
    flip(img, 512 + 40)
    flip(img, 64 * MiB - 512 + 40)
    with pytest.raises(DiskError, match=r"no valid GPT: primary: primary GPT header CRC"):
        read_table(img)


def test_truncated_images(tmp_path):
    img = make_image(tmp_path / "g.img", GPT_SCRIPT)
    os.truncate(img, 48 * MiB)
    with pytest.raises(DiskError, match="truncated"):
        read_table(img)
    img = make_image(tmp_path / "m.img", DOS_SCRIPT)
    os.truncate(img, 48 * MiB)
    with pytest.raises(DiskError, match="past the end of the disk"):
        read_table(img)
    os.truncate(img, 300)  # not even a whole sector: nothing that could be a table
    assert read_table(img).label is None


def write_mbr(path: str, entries: list[tuple[int, int, int]], size: int = 8 * MiB,
              boot: int = 0) -> None:
    """An MBR with (type, start LBA, sectors) entries, written by hand."""
    sector = bytearray(512)
    struct.pack_into("<I", sector, 440, 0x12345678)
    for i, (typ, start, count) in enumerate(entries):
        struct.pack_into("<B3sB3sII", sector, 446 + 16 * i, boot, b"\0\0\0", typ, b"\0\0\0",
                         start, count)
    sector[510:512] = b"\x55\xaa"
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(sector)


def test_garbage(tmp_path):
    img = str(tmp_path / "x.img")
    write_mbr(img, [(0x83, 0xDEADBEEF, 0x1000), (0x07, 100, 0xFFFFFF00)])
    with pytest.raises(DiskError, match="past the end"):
        read_table(img)
    # random data carries no table (it may be an encrypted volume): no error, no partitions
    with open(img, "wb") as f:
        f.write(bytes(range(256)) * 4096 + os.urandom(1 << 20))
    t = read_table(img)
    assert (t.label, t.partitions) == (None, [])
    assert [(s.kind, s.start, s.size) for s in layout(t)] == [("gap", 0, 2 * MiB)]


def test_overlapping_mbr_partitions(tmp_path):
    img = str(tmp_path / "x.img")
    write_mbr(img, [(0x83, 2048, 4096), (0x83, 4000, 100)])
    with pytest.raises(DiskError, match="partition 1 overlaps partition 2"):
        read_table(img)
    write_mbr(img, [(0x83, 0, 100)])
    with pytest.raises(DiskError, match="overlaps"):
        read_table(img)


def rewrite_gpt_entries(path: str, mutate) -> None:
    """Change the GPT entry array by hand and make both copies valid again (CRCs)."""
    with open(path, "r+b") as f:
        f.seek(512)
        hdr = bytearray(f.read(92))
        e_lba, count, esize = struct.unpack_from("<QII", hdr, 72)
        f.seek(e_lba * 512)
        entries = bytearray(f.read(count * esize))
        mutate(entries)
        alt = struct.unpack_from("<Q", hdr, 32)[0]
        f.seek(alt * 512)
        back = bytearray(f.read(92))
        for h, lba in ((hdr, 1), (back, alt)):
            struct.pack_into("<I", h, 88, zlib.crc32(entries))
            struct.pack_into("<I", h, 16, 0)
            struct.pack_into("<I", h, 16, zlib.crc32(h))
            f.seek(lba * 512)
            f.write(h)
            f.seek(struct.unpack_from("<Q", h, 72)[0] * 512)
            f.write(entries)


def test_overlapping_gpt_partitions(tmp_path):
    img = make_image(tmp_path / "g.img", GPT_SCRIPT)
    rewrite_gpt_entries(img, lambda e: struct.pack_into("<Q", e, 128 + 32, 4096))
    with pytest.raises(DiskError, match="partition 1 overlaps partition 2"):
        read_table(img)


def test_gpt_partition_outside_usable_area(tmp_path):
    img = make_image(tmp_path / "g.img", GPT_SCRIPT)
    rewrite_gpt_entries(img, lambda e: struct.pack_into("<Q", e, 40, 64 * MiB // 512 - 2))
    with pytest.raises(DiskError, match="partition 1 .* outside the usable area"):
        read_table(img)


def ebr_offsets(img: str) -> list[int]:
    return [r.start for r in read_table(img).regions if r.what == "ebr"]


def test_ebr_chain_loop(tmp_path):
    img = make_image(tmp_path / "m.img", DOS_SCRIPT)
    last = ebr_offsets(img)[-1]
    with open(img, "r+b") as f:  # the last EBR links back to the first one
        f.seek(last + 446 + 16)
        f.write(struct.pack("<B3sB3sII", 0, b"\0" * 3, 0x05, b"\0" * 3, 0, 2048))
    with pytest.raises(DiskError, match="EBR chain of partition 2 loops"):
        read_table(img)


def test_ebr_and_logical_outside_extended(tmp_path):
    img = make_image(tmp_path / "m.img", DOS_SCRIPT)
    first = ebr_offsets(img)[0]
    with open(img, "r+b") as f:  # link far past the end of the extended partition
        f.seek(first + 446 + 16 + 8)
        f.write(struct.pack("<I", 40 * MiB // 512))
    with pytest.raises(DiskError, match="EBR at sector .* outside extended partition 2"):
        read_table(img)
    img = make_image(tmp_path / "m2.img", DOS_SCRIPT)
    with open(img, "r+b") as f:  # first logical grows past the extended partition
        f.seek(first + 446 + 12)
        f.write(struct.pack("<I", 40 * MiB // 512))
    with pytest.raises(DiskError, match="logical partition 5 lies outside extended"):
        read_table(img)


def test_empty_extended_partition(tmp_path):
    img = make_image(tmp_path / "m.img", "label: dos\nsize=8M\nstart=20M, size=10M, type=f\n")
    t = read_table(img)
    assert [(p.number, p.kind) for p in t.partitions] == [(1, "primary"), (2, "extended")]
    assert_matches_sfdisk(t, sfdisk_json(img))
    assert_tiles(t)


@needs_tool("mkfs.ext4", "mkfs.vfat")
@pytest.mark.parametrize("mkfs", [["mkfs.ext4", "-q", "-F"], ["mkfs.vfat"]])
def test_bare_filesystem_has_no_table(tmp_path, mkfs):
    img = str(tmp_path / "fs.img")
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    subprocess.run([*mkfs, img], check=True, capture_output=True)
    t = read_table(img)
    assert (t.label, t.partitions, t.regions) == (None, [], [])
    assert [(s.kind, s.size) for s in layout(t)] == [("gap", 16 * MiB)]


@needs_tool("mkfs.vfat")
def test_fat_boot_sector_over_a_stale_gpt(tmp_path):
    """A FAT volume made on the whole disk wins over the GPT header left in sector 1."""
    img = make_image(tmp_path / "g.img", GPT_SCRIPT)
    fat = str(tmp_path / "fat.img")
    with open(fat, "wb") as f:
        f.truncate(16 * MiB)
    subprocess.run(["mkfs.vfat", fat], check=True, capture_output=True)
    with open(fat, "rb") as src, open(img, "r+b") as dst:
        dst.write(src.read(512))
    assert read_table(img).label is None


@needs_tool("sgdisk")
def test_hybrid_mbr_is_read_as_gpt(tmp_path):
    img = make_image(tmp_path / "g.img", GPT_SCRIPT)
    subprocess.run(["sgdisk", "-h", "1:2", img], check=True, capture_output=True)
    t = read_table(img)
    assert_matches_sfdisk(t, sfdisk_json(img))
    assert t.notes == ["hybrid MBR: its partition entries are ignored, the GPT rules"]
    assert relocate_backup_gpt(t, 80 * MiB)[0][0] == 512  # the hybrid MBR is left alone


# --- relocation -----------------------------------------------------------------------


def apply(img: str, writes: list[tuple[int, bytes]]) -> None:
    with open(img, "r+b") as f:
        for off, data in writes:
            f.seek(off)
            f.write(data)


@needs_tool("sgdisk")
def test_relocate_backup_gpt_like_sfdisk(tmp_path):
    img = make_image(tmp_path / "g.img", GPT_SCRIPT)
    table = read_table(img)
    os.truncate(img, 100 * MiB)  # restored onto a larger disk
    reference = str(tmp_path / "ref.img")
    shutil.copy(img, reference)
    subprocess.run(["sfdisk", "-q", "--relocate", "gpt-bak-std", reference], check=True,
                   capture_output=True)
    apply(img, relocate_backup_gpt(table, 100 * MiB))
    with open(img, "rb") as a, open(reference, "rb") as b:
        assert a.read() == b.read()  # byte for byte, protective MBR included
    check = subprocess.run(["sgdisk", "-v", img], capture_output=True, text=True)
    assert "No problems found" in check.stdout
    moved = read_table(img)
    assert moved.notes == [] and moved.partitions == table.partitions
    assert moved.regions[-1].start == 100 * MiB - 512
    assert moved.gpt.last_usable_lba == 100 * MiB // 512 - 34
    assert_tiles(moved, img)


def test_relocate_repairs_a_damaged_primary(tmp_path):
    img = make_image(tmp_path / "g.img", GPT_SCRIPT)
    flip(img, 512 + 40)
    table = read_table(img)
    assert "backup" in table.notes[0]
    os.truncate(img, 80 * MiB)
    apply(img, relocate_backup_gpt(table, 80 * MiB))
    check = subprocess.run(["sfdisk", "-V", img], capture_output=True, text=True)
    assert check.returncode == 0 and "No errors detected" in check.stdout
    fixed = read_table(img)
    assert fixed.notes == [] and fixed.partitions == table.partitions
    with pytest.raises(DiskError, match="target has"):
        relocate_backup_gpt(table, 32 * MiB)


@needs_loop
def test_relocate_4096_byte_sectors(tmp_path):
    img = str(tmp_path / "g4.img")
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
    with loop_device_4k(img) as dev:
        make_image(img, "label: gpt\nsize=8M\nsize=4M\n", 32 * MiB, device=dev)
    table = parse(img)
    assert table.sector_size == 4096
    os.truncate(img, 48 * MiB)
    apply(img, relocate_backup_gpt(table, 48 * MiB))
    with loop_device_4k(img) as dev:
        check = subprocess.run(["sfdisk", "-V", dev], capture_output=True, text=True)
        pt = sfdisk_json(dev)
    assert check.returncode == 0, check.stdout + check.stderr
    assert pt["lastlba"] == 48 * MiB // 4096 - 6  # 4 entry sectors and the header
    assert parse(img).notes == []


# --- properties -----------------------------------------------------------------------

_FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # tmp_path is only a scratch directory


@st.composite
def dos_layouts(draw):
    """Primary partitions at arbitrary sectors: adjacent, 1-sector gaps, big gaps."""
    n = draw(st.integers(1, 4))
    pos, out = draw(st.integers(1, 64)), []
    for _ in range(n):
        size = draw(st.integers(1, 2000))
        out.append((draw(st.sampled_from([0x83, 0x07, 0x0C, 0x82])), pos, size))
        pos += size + draw(st.sampled_from([0, 1, 2, 7, 513]))
    return out, pos + draw(st.integers(0, 100))


@settings(max_examples=60, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(spec=dos_layouts())
def test_hand_written_mbr_layout_tiles_the_disk(tmp_path, spec):
    entries, sectors = spec
    img = str(tmp_path / "h.img")
    write_mbr(img, entries, size=sectors * 512 + 3, boot=0x80)  # a partial sector at the end
    t = read_table(img)
    assert [(int(p.type_id, 16), p.start // 512, p.size // 512) for p in t.partitions] == entries
    assert all(p.bootable for p in t.partitions)
    assert_tiles(t, img)


@st.composite
def sfdisk_scripts(draw):
    """Random sfdisk scripts on a small disk (sector granularity): GPT or MBR + logicals."""
    label = draw(st.sampled_from(["gpt", "dos"]))
    lines, pos = [f"label: {label}"], 40 if label == "gpt" else 1
    sizes = draw(st.lists(st.integers(1, 300), min_size=1, max_size=6))
    gaps = draw(st.lists(st.integers(0, 5), min_size=len(sizes), max_size=len(sizes)))
    n_primary = len(sizes) if label == "gpt" else draw(st.integers(0, min(3, len(sizes))))
    expected = []
    for size, gap in zip(sizes[:n_primary], gaps, strict=False):
        pos += gap
        lines.append(f"start={pos}, size={size}")
        expected.append((pos, size))
        pos += size
    logicals = list(zip(sizes[n_primary:], gaps[n_primary:], strict=True))
    if logicals:
        ext_start = pos + gaps[-1]
        pos = ext_start
        body = []
        for size, gap in logicals:
            pos += 1 + gap  # an EBR sector in front of every logical
            body.append(f"start={pos}, size={size}")
            expected.append((pos, size))
            pos += size
        lines.append(f"start={ext_start}, size={pos - ext_start + draw(st.integers(0, 3))}, "
                     "type=5")
        lines += body
    return label, "\n".join(lines) + "\n", expected


@settings(max_examples=25, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(spec=sfdisk_scripts())
def test_sfdisk_layouts_tile_the_disk(tmp_path, spec):
    label, script, expected = spec
    img = make_image(tmp_path / "r.img", script, size=4 * MiB)
    t = read_table(img)
    assert t.label == label
    assert_matches_sfdisk(t, sfdisk_json(img))
    assert sorted((p.start // 512, p.size // 512) for p in t.data_partitions) == sorted(expected)
    assert_tiles(t, img)
