"""`create` warns where a Borg habit surprises users (issue 8, point 14), as a user runs it.

- A device node, FIFO or symlink to one named on the command line without
  ``--read-special`` is stored as a node (like Borg); users who name ``/dev/sda`` expect
  the disk's content: one warning line pointing at ``--read-special``, exit code 1.
- ``--skip-unused`` skips the free space of a filesystem; on a partitioned disk or
  image it finds none: one warning line naming the table and pointing at ``disk backup``.
"""

from __future__ import annotations

import os
import random
import subprocess

import pytest
from support import dv, init_repo, loop_device, needs_loop, needs_tool

MiB = 1 << 20


@pytest.fixture
def repo(tmp_path) -> str:
    path = str(tmp_path / "repo")
    init_repo(path)
    return path


def one_warning(r: subprocess.CompletedProcess, *parts: str) -> str:
    err = r.stderr.decode()
    assert r.returncode == 1, (r.returncode, err)
    assert err.count("\n") == 1 and err.startswith("diskvault: warning: "), err
    for p in parts:
        assert p in err, err
    return err


def items(location: str) -> list[str]:
    out = dv("list", "--format", "{type} {path} {size}{NL}", location).stdout.decode()
    return out.splitlines()


def test_a_named_character_device_or_fifo_warns_that_only_the_node_was_stored(repo, tmp_path):
    one_warning(dv("create", f"{repo}::null", "/dev/null", check=False),
                "/dev/null is a character device: only the node was stored",
                "--read-special")
    assert items(f"{repo}::null") == ["chardev dev/null 0"]
    tree = tmp_path / "tree"
    tree.mkdir()
    fifo = str(tree / "fifo")
    os.mkfifo(fifo)
    one_warning(dv("create", f"{repo}::fifo", fifo, check=False),
                f"{fifo} is a FIFO: only the node was stored", "--read-special")
    # nodes met inside a directory are what a tree holds: no warning, as in Borg
    r = dv("create", f"{repo}::tree", str(tree))
    assert r.returncode == 0 and r.stderr == b""
    assert items(f"{repo}::tree") == [f"dir {str(tree).lstrip('/')} 0",
                                      f"fifo {fifo.lstrip('/')} 0"]
    # with --read-special the content is read: no warning
    r = dv("create", "--read-special", f"{repo}::zero", "/dev/null")
    assert r.returncode == 0 and r.stderr == b""
    assert items(f"{repo}::zero") == ["file dev/null 0"]


@needs_loop
def test_a_named_block_device_or_a_link_to_it_warns(repo, tmp_path):
    img = str(tmp_path / "disk.img")
    data = random.Random(3).randbytes(4 * MiB)
    with open(img, "wb") as f:
        f.write(data)
    with loop_device(img, read_only=True) as dev:
        one_warning(dv("create", f"{repo}::node", dev, check=False),
                    f"{dev} is a block device: only the node was stored", "--read-special",
                    "disk backup")
        assert items(f"{repo}::node") == [f"blockdev {dev.lstrip('/')} 0"]
        link = str(tmp_path / "by-id-link")
        os.symlink(dev, link)
        one_warning(dv("create", f"{repo}::link", link, check=False),
                    f"{link} is a symlink to a block device: only the symlink was stored",
                    "--read-special")
        r = dv("create", "--read-special", f"{repo}::content", link)
        assert r.returncode == 0 and r.stderr == b""
    assert dv("extract", "--stdout", f"{repo}::content").stdout == data


@needs_tool("sfdisk")
@pytest.mark.parametrize("label", ["gpt", "dos"])
def test_skip_unused_on_a_partitioned_image_points_to_disk_backup(repo, tmp_path, label):
    img = str(tmp_path / "disk.img")
    data = bytearray(random.Random(5).randbytes(8 * MiB))
    with open(img, "wb") as f:
        f.write(data)
    subprocess.run(["sfdisk", "-q", img], input=f"label: {label}\nsize=4MiB\n".encode(),
                   check=True, capture_output=True)
    with open(img, "rb") as f:
        data = f.read()
    name = {"gpt": "GPT", "dos": "MBR"}[label]
    one_warning(dv("create", "--skip-unused", f"{repo}::img", img, check=False),
                f"{img} holds a {name} partition table", "disk backup")
    assert dv("extract", "--stdout", f"{repo}::img").stdout == data  # every block was read
    info = dv("info", "--json", f"{repo}::img").stdout.decode()
    assert f"holds a {name} partition table, not a filesystem" in info
    # without --skip-unused there is nothing to advise
    r = dv("create", f"{repo}::plain", img)
    assert r.returncode == 0 and r.stderr == b""


@needs_loop
@needs_tool("sfdisk")
def test_skip_unused_on_a_partitioned_device_points_to_disk_backup(repo, tmp_path):
    img = str(tmp_path / "disk.img")
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    subprocess.run(["sfdisk", "-q", img], input=b"label: gpt\nsize=4MiB\n", check=True,
                   capture_output=True)
    with loop_device(img, read_only=True) as dev:
        one_warning(dv("create", "--read-special", "--skip-unused", f"{repo}::dev", dev,
                       check=False), f"{dev} holds a GPT partition table", "disk backup")
