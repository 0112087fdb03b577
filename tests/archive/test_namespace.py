"""The naming scheme shared by mount and extract, without FUSE or root: archive items,
``disk.img``, ``ITEM.files`` trees read by The Sleuth Kit (also per partition of an
image), real items named ``X.files``, and which extract paths go to the file trees."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest
from support import needs_tool

from diskvault.archive.file_extract import files_paths
from diskvault.archive.model import DIR, FILE, HARDLINK, SYMLINK, Item

pytsk3 = pytest.importorskip("pytsk3", reason="needs pytsk3 (the mount extra)")

from diskvault.archive.namespace import DISK_IMG, ArchiveTree, has_files_part  # noqa: E402


class Bytes:
    """An item reader over bytes in memory."""

    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


def _ext4(tmp: Path, mib: int = 8) -> tuple[bytes, Path]:
    src = tmp / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc/fstab").write_bytes(b"/dev/vda1 / ext4 defaults 0 1\n")
    (src / "bin").mkdir()
    (src / "bin/tool").write_bytes(os.urandom(200_000))
    os.chmod(src / "bin/tool", 0o751)
    os.utime(src / "bin/tool", (1_600_000_000, 1_600_000_000))
    os.symlink("../etc/fstab", src / "bin/link")
    img = tmp / "fs.img"
    with open(img, "wb") as f:
        f.truncate(mib << 20)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", src, img], check=True)
    return img.read_bytes(), src


def _item(path: str, typ: str = FILE, **kw: object) -> Item:
    kw.setdefault("source", "file")
    return Item(path=path, type=typ, mode=kw.pop("mode", 0o100644), **kw)  # type: ignore[arg-type]


@needs_tool("mke2fs")
def test_items_and_file_trees(tmp_path: Path) -> None:
    fs, src = _ext4(tmp_path)
    items = [
        _item("home", DIR, mode=0o40700, mtime=5),
        _item("home/x.files", DIR, mode=0o40755),  # a real item named like a tree
        _item("home/hard", HARDLINK, target="home/a"),  # before its master: still works
        _item("home/a", size=3, mtime=7),
        _item("home/ln", SYMLINK, target="a", mode=0o120777),
        _item("vm.img", size=len(fs)),
        _item("x", size=len(fs)),  # not image-like by name: no tree listed, but reachable
    ]
    readers = {"home/a": Bytes(b"abc"), "vm.img": Bytes(fs), "x": Bytes(fs)}
    tree = ArchiveTree(items, readers, disk=Bytes(b"D" * 4096))
    assert sorted(tree.listdir("")) == sorted(["home", "vm.img", "vm.img.files", "x",
                                               DISK_IMG])
    assert sorted(tree.listdir("home")) == ["a", "hard", "ln", "x.files"]
    assert tree.lookup("home/x.files").mode == 0o40755 and not tree.listdir("home/x.files")
    a, hard = tree.lookup("home/a"), tree.lookup("home/hard")
    assert a is hard and a.nlink == 2 and a.content is not None
    assert a.content.read(0, 10) == b"abc"
    ln = tree.lookup("home/ln")
    assert ln.type == SYMLINK and ln.size == 1
    assert tree.lookup(DISK_IMG).size == 4096
    # the files inside, with their metadata
    top = tree.listdir("vm.img.files")
    assert {"etc", "bin", "lost+found"} <= set(top)
    tool = tree.lookup("vm.img.files/bin/tool")
    assert stat.S_IMODE(tool.mode) == 0o751 and tool.mtime_ns == 1_600_000_000 * 10**9
    assert tool.tree is not None and tool.entry is not None
    data = tool.tree.read(tool.entry, 0, tool.size)
    assert hashlib.sha256(data).digest() == hashlib.sha256(
        (src / "bin/tool").read_bytes()).digest()
    assert tree.lookup("vm.img.files/bin/link").target == "../etc/fstab"
    assert "x.files" not in tree.listdir("")
    assert tree.lookup("x.files/etc/fstab").size == len((src / "etc/fstab").read_bytes())
    for missing in ("nope", "vm.img.files/nope", "home/a.files", "vm.img.files/etc/fstab/x"):
        with pytest.raises((FileNotFoundError, NotADirectoryError)):
            tree.lookup(missing)


@needs_tool("mke2fs", "sfdisk")
def test_partitioned_image_gets_one_tree_per_partition(tmp_path: Path) -> None:
    fs, _ = _ext4(tmp_path, 4)
    img = tmp_path / "gpt.img"
    with open(img, "wb") as f:
        f.truncate(len(fs) + (2 << 20))
    subprocess.run(["sfdisk", "-q", str(img)], check=True, capture_output=True,
                   input=f"label: gpt\nstart=2048, size={len(fs) // 512}\n".encode())
    data = bytearray(img.read_bytes())
    data[1 << 20 : (1 << 20) + len(fs)] = fs
    tree = ArchiveTree([_item("gpt.img", size=len(data))], {"gpt.img": Bytes(bytes(data))})
    assert list(tree.listdir("gpt.img.files")) == ["part1"]
    assert "etc" in tree.listdir("gpt.img.files/part1")
    assert tree.lookup("gpt.img.files/part1/etc/fstab").size > 0


def test_extract_routing() -> None:
    items = {"disk/part2", "home/x.files", "home/x.files/a", "vm.img"}
    paths = ["disk/part2.files/etc/fstab", "home/x.files/a", "vm.img.files",
             "vm.img.files/part1/*", "disk/part2", "other.files/x"]
    assert files_paths(items, paths) == ["disk/part2.files/etc/fstab", "vm.img.files",
                                         "vm.img.files/part1/*"]
    assert has_files_part("a/b.files/c") and not has_files_part("a/.files/c")
