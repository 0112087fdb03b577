"""`diskvault disk list`, run as a user would, on a fake sysfs naming real loop devices."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from support import dv, loop_device, needs_loop, needs_tool

from diskvault.cli import disk_cmd
from diskvault.source.disks import SYSFS_ENV

MiB = 1 << 20


def image(path, script: str, size: int = 32 * MiB, ext4_at: int | None = None) -> str:
    path = str(path)
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "-q", path], input=script, text=True, check=True,
                   capture_output=True)
    if ext4_at is not None:
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", f"offset={ext4_at}", path, "4M"],
                       check=True, capture_output=True)
    return path


def fake_sys(root, disks: dict[str, tuple[str, dict[str, str]]]) -> str:
    """block/<name>/ for each (device node, attributes); `dev` comes from the real node."""
    (root / "block").mkdir(parents=True)
    for name, (node, attrs) in disks.items():
        rdev = os.stat(node).st_rdev
        files = {"dev": f"{os.major(rdev)}:{os.minor(rdev)}",
                 "size": str(os.path.getsize(attrs.pop("image")) // 512), **attrs}
        for rel, content in files.items():
            p = root / "block" / name / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(content + "\n")
    return str(root)


def sfdisk_parts(target: str) -> list[tuple[int, int, int]]:
    pt = json.loads(subprocess.run(["sfdisk", "--json", target], capture_output=True,
                                   check=True, text=True).stdout)["partitiontable"]
    return [(int(re.search(r"(\d+)$", p["node"]).group(1)), p["start"] * 512, p["size"] * 512)
            for p in pt["partitions"]]


GPT = "label: gpt\nsize=4M, type=L, name=data\nsize=2M, type=S\n"
DOS = "label: dos\nsize=4M, type=83, bootable\nstart=8M, size=12M, type=5\nstart=9M, size=2M\n" \
      "start=12M, size=3M, type=7\n"


@needs_loop
@needs_tool("sfdisk", "mkfs.ext4")
def test_disk_list_json_and_table(tmp_path):
    gpt = image(tmp_path / "g.img", GPT, ext4_at=MiB)
    dos = image(tmp_path / "m.img", DOS)
    with loop_device(gpt) as dev_g, loop_device(dos) as dev_m:
        root = fake_sys(tmp_path / "sys", {
            "sda": (dev_g, {"image": gpt, "device/serial": "SN-CLI-1",
                            "device/model": "Test Disk", "queue/logical_block_size": "512"}),
            "sdb": (dev_m, {"image": dos, "device/serial": "SN-CLI-2"}),
        })
        env = {SYSFS_ENV: root}
        data = json.loads(dv("disk", "list", "--json", env=env).stdout)
        text = dv("disk", "list", env=env).stdout.decode()
        expected_g, expected_m = sfdisk_parts(dev_g), sfdisk_parts(dev_m)
    by_serial = {d["serial"]: d for d in data["disks"]}
    assert sorted(by_serial) == ["SN-CLI-1", "SN-CLI-2"]
    g = by_serial["SN-CLI-1"]
    assert (g["path"], g["size"], g["model"], g["label"]) == (dev_g, 32 * MiB, "Test Disk", "gpt")
    assert [(p["number"], p["start"], p["size"]) for p in g["partitions"]] == expected_g
    assert [p["fs_type"] for p in g["partitions"]] == ["ext4", None]
    m = by_serial["SN-CLI-2"]
    assert [(p["number"], p["start"], p["size"]) for p in m["partitions"]] == expected_m
    assert [(p["number"], p["kind"]) for p in m["partitions"]] == [
        (1, "primary"), (2, "extended"), (5, "logical"), (6, "logical")]

    lines = text.splitlines()
    assert lines[0].split() == ["DEVICE", "SIZE", "START", "FSTYPE", "MOUNTPOINT", "MODEL", "/",
                                "TYPE", "SERIAL"]
    row = lines.index(next(line for line in lines if line.startswith(dev_g)))
    assert re.match(rf"{dev_g}\s+32\.0 MiB\s+\[gpt\]\s+-\s+Test Disk\s+SN-CLI-1$", lines[row])
    assert re.match(r"\s+1\s+4\.0 MiB\s+1\.0 MiB\s+ext4\s+-\s+Linux filesystem$", lines[row + 1])
    assert re.match(r"\s+2\s+2\.0 MiB\s+5\.0 MiB\s+-\s+-\s+Linux swap$", lines[row + 2])
    row = lines.index(next(line for line in lines if line.startswith(dev_m)))
    numbers = [int(line.split()[0]) for line in lines[row + 1 : row + 5]]
    assert numbers == [1, 2, 5, 6]


@needs_loop
@needs_tool("sfdisk")
def test_disk_list_shows_notes_and_errors_but_succeeds(tmp_path):
    damaged = image(tmp_path / "d.img", GPT)
    with open(damaged, "r+b") as f:  # break the primary header's CRC
        f.seek(512 + 40)
        f.write(b"\xff")
    garbage = image(tmp_path / "x.img", DOS)
    with open(garbage, "r+b") as f:  # partition 1 now reaches far past the end
        f.seek(446 + 12)
        f.write((10**9).to_bytes(4, "little"))
    with loop_device(damaged) as d1, loop_device(garbage) as d2:
        root = fake_sys(tmp_path / "sys", {"sda": (d1, {"image": damaged}),
                                           "sdb": (d2, {"image": garbage})})
        r = dv("disk", "list", env={SYSFS_ENV: root})
    out = r.stdout.decode()
    assert "note: primary GPT is damaged (primary GPT header CRC mismatch)" in out
    assert re.search(r"partition table not read: MBR partition 1 ends at byte \d+, past the end",
                     out)
    assert r.stderr == b""


def test_disk_list_without_disks_and_usage_errors(tmp_path):
    (tmp_path / "sys" / "block").mkdir(parents=True)
    env = {SYSFS_ENV: str(tmp_path / "sys")}
    assert dv("disk", "list", env=env).stdout.decode().endswith("(no block devices found)\n")
    assert json.loads(dv("disk", "list", "--json", env=env).stdout) == {"disks": []}
    r = dv("disk", env=env, check=False)
    assert r.returncode == 2
    assert r.stderr.decode().splitlines() == [
        "diskvault: error: the following arguments are required: SUBCOMMAND"]


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"),
                                         (3 * MiB // 2, "1.5 MiB"), (1 << 40, "1.0 TiB")])
def test_human_sizes(n, text):
    assert disk_cmd.human(n) == text
