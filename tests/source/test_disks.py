"""Disk inventory: serial lookup on a fake sysfs, loop devices and mounts on the real one."""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest
from support import loop_device, needs_loop, needs_tool

from diskvault.errors import DiskError, SourceError
from diskvault.source import disks
from diskvault.source.disks import SYSFS_ENV, Inventory, find_by_serial, is_mounted, list_disks
from diskvault.source.partitions import read_table

MiB = 1 << 20
GPT_SCRIPT = "label: gpt\nsize=8M, type=L\nsize=4M, type=S\nstart=20M, size=2M, type=U\n"


def make_disk_image(path, size: int = 32 * MiB, ext4: bool = True) -> str:
    """A GPT image whose first partition (at 1 MiB, 8 MiB) holds an ext4 filesystem."""
    path = str(path)
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "-q", path], input=GPT_SCRIPT, text=True, check=True,
                   capture_output=True)
    if ext4:
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", f"offset={MiB}", path, "8M"],
                       check=True, capture_output=True)
    return path


def dev_numbers(node: str) -> str:
    rdev = os.stat(node).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def fake_sysfs(root, entries: dict[str, dict[str, str | bytes]]) -> str:
    """A /sys tree with block/<name>/<attr> files, as the kernel lays them out."""
    for name, attrs in entries.items():
        for rel, content in attrs.items():
            p = root / "block" / name / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content if isinstance(content, bytes) else f"{content}\n".encode())
    (root / "block").mkdir(parents=True, exist_ok=True)
    return str(root)


def vpd_pg80(serial: str) -> bytes:
    body = serial.encode()
    return bytes([0, 0x80]) + len(body).to_bytes(2, "big") + body


def entry(dev: str, size: int, **extra: str | bytes) -> dict[str, str | bytes]:
    return {"dev": dev, "size": str(size // 512), "queue/logical_block_size": "512", **extra}


# --- serial lookup on a fake sysfs (device numbers borrowed from real devices) --------


def test_serial_lookup_no_match_two_matches_one_match(tmp_path, monkeypatch):
    root = fake_sysfs(tmp_path / "sys", {
        "sda": entry("8:0", 64 * MiB, **{"device/serial": "  WD-7VS0224F  ",
                                       "device/model": "WDC WD40EFRX"}),
        "sdb": entry("8:16", 32 * MiB, **{"device/vpd_pg80": vpd_pg80("S21NX0AG   ")}),
        "sdc": entry("8:32", 32 * MiB, **{"device/vpd_pg80": vpd_pg80("S21NX0AG")}),
        "nvme0n1": entry("259:0", 16 * MiB, wwid="eui.0025388b71b0c4a1"),
        "loop9": entry("7:9", 0),  # an unattached loop: no size, not a disk
    })
    inv = Inventory(root)
    assert [d.name for d in inv.disks(probe=False)] == ["nvme0n1", "sda", "sdb", "sdc"]
    one = inv.find_by_serial("WD-7VS0224F")
    assert (one.name, one.size, one.model, one.serial) == ("sda", 64 * MiB, "WDC WD40EFRX",
                                                           "WD-7VS0224F")
    assert inv.find_by_serial("eui.0025388b71b0c4a1").name == "nvme0n1"
    with pytest.raises(DiskError, match=r"matches 2 disks \(/dev/sdb, /dev/sdc\)"):
        inv.find_by_serial("S21NX0AG")
    # the seed's `by-id/*SERIAL` glob would take a suffix; we only hint at it
    with pytest.raises(DiskError, match=r"no disk has serial '224F'; partial matches.*sda"):
        inv.find_by_serial("224F")
    with pytest.raises(DiskError, match="no disk has serial 'XYZ'"):
        inv.find_by_serial("XYZ")
    monkeypatch.setenv(SYSFS_ENV, root)  # the module-level API honours the environment
    assert find_by_serial("WD-7VS0224F").name == "sda"


@needs_loop
def test_fake_sysfs_pointing_at_real_loop_devices(tmp_path, monkeypatch):
    img_a = make_disk_image(tmp_path / "a.img")
    img_b = make_disk_image(tmp_path / "b.img", ext4=False)
    with loop_device(img_a) as dev_a, loop_device(img_b) as dev_b:
        root = fake_sysfs(tmp_path / "sys", {
            # kernel names that do not exist in /dev: the node is found by device number
            "sdx": entry(dev_numbers(dev_a), 32 * MiB, **{"device/serial": "SER-A"}),
            "sdy": entry(dev_numbers(dev_b), 32 * MiB, **{"device/serial": "SER-B"}),
        })
        monkeypatch.setenv(SYSFS_ENV, root)
        disk = find_by_serial("SER-B")
        assert disk.path == dev_b and disk.name == "sdy"
        listed = {d.serial: d for d in list_disks()}
    a = listed["SER-A"]
    assert (a.path, a.label, a.identity) == (dev_a, "gpt", "SER-A")
    assert a.disk_id == read_table(img_a).disk_id
    assert [(p.number, p.start, p.size, p.type_name) for p in a.partitions] == [
        (1, MiB, 8 * MiB, "Linux filesystem"), (2, 9 * MiB, 4 * MiB, "Linux swap"),
        (3, 20 * MiB, 2 * MiB, "EFI System")]
    assert [p.fs_type for p in a.partitions] == ["ext4", None, None]
    assert [p.fs_type for p in listed["SER-B"].partitions] == [None, None, None]


@needs_loop
def test_kernel_partition_nodes_from_sysfs(tmp_path):
    """On a real machine the kernel lists sda1 under sda: its node and mounts are used."""
    img = make_disk_image(tmp_path / "disk.img", ext4=False)
    with loop_device(img) as whole, loop_device(img, offset=MiB, sizelimit=8 * MiB) as p1:
        root = fake_sysfs(tmp_path / "sys", {
            "sda": entry(dev_numbers(whole), 32 * MiB, **{"device/serial": "SER-P"}),
            "sda/sda1": {"dev": dev_numbers(p1), "partition": "1", "start": "2048",
                         "size": "16384"},
        })
        mountinfo = tmp_path / "mountinfo"
        mountinfo.write_text(f"30 1 {dev_numbers(p1)} / /data rw - ext4 {p1} rw\n")
        inv = Inventory(root, mountinfo=str(mountinfo), swaps=os.devnull)
        (disk,) = inv.disks()
        assert [(p.number, p.path) for p in disk.partitions] == [(1, p1), (2, None), (3, None)]
        assert disk.partitions[0].mountpoints == ["/data"] and disk.mountpoints == []
        assert inv.is_mounted(whole) and inv.is_mounted(p1)


def test_unreadable_disk_is_listed_with_its_error(tmp_path):
    root = fake_sysfs(tmp_path / "sys", {"sdq": entry("8:240", 8 * MiB, serial="VIRTIO-1")})
    (d,) = Inventory(root, dev_root=str(tmp_path / "dev")).disks()
    assert d.serial == "VIRTIO-1" and d.path == str(tmp_path / "dev" / "sdq")
    assert d.partitions == [] and "cannot open" in d.table_error


# --- the real sysfs -------------------------------------------------------------------


@needs_loop
def test_loop_devices_in_the_real_sysfs(tmp_path):
    img = make_disk_image(tmp_path / "disk.img")
    with loop_device(img) as whole:
        with loop_device(img, offset=MiB, sizelimit=8 * MiB) as part:
            found = {d.path: d for d in list_disks()}
            # two loops on one file: the backing file does not pin down one disk
            with pytest.raises(DiskError, match="matches 2 disks"):
                find_by_serial(img)
        assert find_by_serial(img).path == whole
    w, p = found[whole], found[part]
    assert (w.backing_file, w.loop_offset, w.size, w.identity) == (img, 0, 32 * MiB, img)
    assert (w.label, [q.number for q in w.partitions]) == ("gpt", [1, 2, 3])
    assert w.partitions[0].fs_type == "ext4"
    assert (p.loop_offset, p.loop_sizelimit, p.size) == (MiB, 8 * MiB, 8 * MiB)
    assert (p.label, p.partitions, p.fs_type) == (None, [], "ext4")  # a bare filesystem


@needs_loop
@needs_tool("mount", "umount", "mkfs.ext4")
def test_is_mounted_sees_overlapping_devices(tmp_path):
    img = make_disk_image(tmp_path / "disk.img")
    other = make_disk_image(tmp_path / "other.img", ext4=False)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with contextlib.ExitStack() as stack:
        whole = stack.enter_context(loop_device(img))
        swap_part = stack.enter_context(loop_device(img, offset=9 * MiB, sizelimit=4 * MiB))
        p1 = stack.enter_context(loop_device(img, offset=MiB, sizelimit=8 * MiB))
        assert not is_mounted(img) and not is_mounted(whole)
        subprocess.run(["mount", p1, str(mnt)], check=True, capture_output=True)
        stack.callback(subprocess.run, ["umount", str(mnt)], check=False)
        assert is_mounted(p1) and is_mounted(whole) and is_mounted(img)
        assert not is_mounted(swap_part)  # same file, bytes next to the mounted ones
        assert not is_mounted(other)
        listed = {d.path: d for d in list_disks()}
        assert listed[whole].partitions[0].mountpoints == [str(mnt)]
        assert listed[whole].partitions[1].mountpoints == []
        assert listed[whole].mountpoints == []  # shown on the partition, not twice
        assert listed[p1].mountpoints == [str(mnt)]
        subprocess.run(["umount", str(mnt)], check=True)
        assert not is_mounted(img) and not is_mounted(whole)
    with pytest.raises(SourceError, match="missing.img: No such file"):
        is_mounted(str(tmp_path / "missing.img"))
    with pytest.raises(SourceError, match="neither a block device nor an image"):
        is_mounted(str(tmp_path))


@needs_loop
def test_mountinfo_and_swaps_parsing(tmp_path):
    img = make_disk_image(tmp_path / "disk.img", ext4=False)
    with loop_device(img) as dev, loop_device(img, offset=9 * MiB, sizelimit=4 * MiB) as sw:
        mountinfo = tmp_path / "mountinfo"
        mountinfo.write_text(
            f"27 1 {dev_numbers(dev)} / /mnt/with\\040space rw - ext4 {dev} rw\n"
            "28 27 0:25 / /tmp rw - tmpfs tmpfs rw\n"
        )
        swaps = tmp_path / "swaps"
        swaps.write_text("Filename Type Size Used Priority\n"
                         f"{sw} partition 4096 0 -2\n")
        inv = Inventory(mountinfo=str(mountinfo), swaps=str(swaps))
        assert inv.mounts_overlapping(inv.extents_of_path(img)) == ["/mnt/with space", "[SWAP]"]
        assert inv.is_mounted(sw)
        other = make_disk_image(tmp_path / "o.img", ext4=False)
        assert not inv.is_mounted(other)


def test_vpd_page_parsing(tmp_path):
    p = tmp_path / "vpd"
    p.write_bytes(vpd_pg80("  ZA1B2C3D  ") + b"\0\0")
    assert disks._vpd_serial(str(p)) == "ZA1B2C3D"
    p.write_bytes(b"\0\x83\0\x04abcd")  # another page: not a serial
    assert disks._vpd_serial(str(p)) is None
