"""VM image files as sources and targets of `disk backup` / `disk restore`, through QEMU.

A qcow2 made with the real tools (a GPT disk with an ext4 partition holding files,
converted with `qemu-img convert`, compressed clusters and a backing chain included) is
backed up as the guest's disk: partitions and block maps are applied, only the used
blocks are read, and restores to raw and to qcow2 give the same guest disk
(`qemu-img compare`, and byte for byte against `extract --stdout`).
"""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest
from support import dv, init_repo, needs_tool, sha256_file

MiB = 1 << 20
pytestmark = needs_tool("qemu-img", "qemu-storage-daemon", "mke2fs", "sfdisk", "fusermount3")


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def make_guest_disk(d: str, size_mib: int = 64) -> str:
    """A raw GPT disk: partition 1 ext4 with ~6 MiB of files (free space random),
    partition 2 raw random data; the rest of the disk unallocated."""
    rnd = random.Random(7)
    tree = os.path.join(d, "tree")
    os.makedirs(os.path.join(tree, "etc"))
    with open(os.path.join(tree, "etc", "fstab"), "w") as f:
        f.write("/dev/vda1 / ext4 defaults 0 1\n")
    for i in range(6):
        with open(os.path.join(tree, f"f{i}.bin"), "wb") as f:
            f.write(rnd.randbytes(MiB))
    part1 = os.path.join(d, "p1.img")
    with open(part1, "wb") as f:  # stale data in the free space: must not be read
        f.write(rnd.randbytes(32 * MiB))
    run("mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, part1)
    disk = os.path.join(d, "guest.raw")
    with open(disk, "wb") as f:
        f.truncate(size_mib * MiB)
    subprocess.run(["sfdisk", "-q", disk], check=True, input="label: gpt\n"
                   "start=2048, size=65536, type=linux\nstart=67584, size=8192, type=linux\n",
                   text=True)
    with open(disk, "r+b") as f, open(part1, "rb") as p:
        f.seek(2048 * 512)
        f.write(p.read())
        f.seek(67584 * 512)
        f.write(rnd.randbytes(4 * MiB))
    return disk


@pytest.fixture(scope="module")
def guest(tmp_path_factory) -> dict[str, str]:
    d = str(tmp_path_factory.mktemp("guest"))
    raw = make_guest_disk(d)
    qcow = os.path.join(d, "guest.qcow2")
    run("qemu-img", "convert", "-c", "-O", "qcow2", raw, qcow)  # compressed clusters
    # an overlay with a backing file: the guest disk is base + overlay
    overlay = os.path.join(d, "overlay.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", qcow, "-F", "qcow2", overlay)
    run("qemu-io", "-c", f"write -P 0x5a {67584 * 512} 65536", overlay)
    return {"raw": raw, "qcow2": qcow, "overlay": overlay}


def leftover_exports() -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line for line in f if "diskvault-qemu-" in line]


def backup(repo: str, name: str, *args: str) -> dict:
    return json.loads(dv("disk", "backup", "--json", f"{repo}::{name}", *args).stdout)


def test_qcow2_backed_up_as_guest_disk_and_restored_to_raw_and_qcow2(guest, tmp_path):
    repo = str(tmp_path / "repo")
    init_repo(repo)
    j = backup(repo, "q", guest["qcow2"])
    a = j["archive"]
    assert a["disk"]["label"] == "gpt" and a["disk"]["image_format"] == "qcow2"
    items = {i["path"]: i for i in a["items"]}
    assert items["disk/part1"]["fs"] == "ext4" and items["disk/part1"]["unused"] > 8 * MiB
    # read ≈ the guest's used blocks: not the 32 MiB partition, not the 64 MiB disk
    used = 32 * MiB - items["disk/part1"]["unused"] + 4 * MiB
    assert a["stats"]["read"] <= used + MiB, (a["stats"]["read"], used)
    assert a["disk"]["size"] == 64 * MiB

    # the archive is the guest disk: same bytes as a backup of the raw disk it came from
    stream = dv("extract", "--stdout", f"{repo}::q").stdout
    backup(repo, "r", guest["raw"])
    assert stream == dv("extract", "--stdout", f"{repo}::r").stdout

    out_raw, out_q = str(tmp_path / "out.raw"), str(tmp_path / "out.qcow2")
    dv("disk", "restore", f"{repo}::q", out_raw)
    dv("disk", "restore", f"{repo}::q", out_q)
    info = json.loads(run("qemu-img", "info", "--output=json", out_q))
    assert info["format"] == "qcow2" and info["virtual-size"] == 64 * MiB
    # sparse: free ext4 blocks and the empty disk end are not allocated in the qcow2
    assert info["actual-size"] < 24 * MiB, info["actual-size"]
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", out_raw, out_q)
    with open(out_raw, "rb") as f:
        assert f.read() == stream
    run("e2fsck", "-fn", _partition_copy(out_raw, tmp_path))


def _partition_copy(disk: str, tmp_path) -> str:
    p = str(tmp_path / "p1.check")
    with open(disk, "rb") as f, open(p, "wb") as o:
        f.seek(2048 * 512)
        o.write(f.read(32 * MiB))
    return p


def test_backing_chain_is_resolved(guest, tmp_path):
    repo = str(tmp_path / "repo")
    init_repo(repo)
    backup(repo, "o", guest["overlay"])
    out = str(tmp_path / "o.raw")
    dv("disk", "restore", f"{repo}::o", out)
    with open(out, "rb") as f:
        f.seek(67584 * 512)
        assert f.read(65536) == b"\x5a" * 65536  # the overlay's write
        assert f.read(4096) != bytes(4096)  # base data after it
    run("qemu-img", "compare", "-f", "raw", out, guest["overlay"])


def test_image_format_raw_stores_the_container_and_bad_format_is_refused(guest, tmp_path):
    repo = str(tmp_path / "repo")
    init_repo(repo)
    r = dv("disk", "backup", "--image-format", "bogus", f"{repo}::x", guest["qcow2"],
           check=False)
    assert r.returncode == 2 and b"unknown image format" in r.stderr
    assert r.stderr.count(b"\n") == 1
    dv("create", f"{repo}::file", guest["qcow2"])  # create keeps the file's own bytes
    got = dv("extract", "--stdout", f"{repo}::file").stdout
    assert len(got) == os.path.getsize(guest["qcow2"])
    assert got[:4] == b"QFI\xfb"
    # no qemu-storage-daemon or FUSE mount left behind
    assert not leftover_exports()


def test_restore_into_too_small_qcow2_is_refused_and_new_image_removed_on_error(guest, tmp_path):
    repo = str(tmp_path / "repo")
    init_repo(repo)
    backup(repo, "q", guest["qcow2"])
    small = str(tmp_path / "small.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", small, str(16 * MiB))
    before = sha256_file(small)
    r = dv("disk", "restore", f"{repo}::q", small, check=False)
    assert r.returncode == 2 and r.stderr.count(b"\n") == 1, r.stderr
    assert sha256_file(small) == before
    r = dv("disk", "restore", "--dry-run", f"{repo}::q", str(tmp_path / "new.qcow2"))
    assert not os.path.exists(tmp_path / "new.qcow2")
    assert not leftover_exports()
