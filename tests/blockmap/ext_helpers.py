"""Helpers for the ext block-map proofs: real images, dumpe2fs reference, file checksums."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from support import have_root, have_tool, loop_device

from diskvault.blockmap.base import BlockMap


def random_file(path: Path, size: int) -> None:
    """Fill ``path`` with random bytes, so free space later holds stale non-zero data."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 << 20)
            f.write(os.urandom(n))
            left -= n


def run(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}{r.stdout}")
    return r.stdout


def mkfs(image: Path, size: int, *args: str) -> None:
    """mke2fs over random bytes; never discard (it would zero the free space)."""
    random_file(image, size)
    run("mke2fs", "-q", "-F", "-E", "nodiscard", *args, str(image))


def populate(root: Path, rng: random.Random, nfiles: int, max_size: int) -> None:
    """A small tree: files of random sizes (some empty, some multi-MiB) in subdirectories."""
    for i in range(nfiles):
        d = root / f"d{i % 4}" / f"e{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        size = rng.choice([0, rng.randrange(1, 5000), rng.randrange(1, max_size)])
        (d / f"f{i}.bin").write_bytes(rng.randbytes(size))


def tree_sums(root: Path) -> dict[str, str]:
    """SHA-256 of every regular file below ``root`` (lost+found excluded)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith("lost+found"):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def dumpe2fs_used(image: Path) -> tuple[int, int, np.ndarray]:
    """(block size, block count, used-per-block bools) from dumpe2fs's free ranges."""
    text = run("dumpe2fs", str(image))
    bs = int(re.search(r"^Block size:\s+(\d+)", text, re.M).group(1))
    nblocks = int(re.search(r"^Block count:\s+(\d+)", text, re.M).group(1))
    cluster = re.search(r"^Cluster size:\s+(\d+)", text, re.M)
    ratio = int(cluster.group(1)) // bs if cluster else 1
    used = np.ones(nblocks, dtype=bool)
    for line in re.findall(r"^\s+Free blocks: (.*)$", text, re.M):
        for part in filter(None, (p.strip() for p in line.split(","))):
            a, _, b = part.partition("-")
            # bigalloc: dumpe2fs ends a range at the first block of its last cluster
            last = (int(b or a) // ratio + 1) * ratio
            used[int(a) : last] = False
    return bs, nblocks, used


def dumpe2fs_metadata(image: Path) -> set[int]:
    """Blocks dumpe2fs lists as superblocks, descriptors, reserved GDT, bitmaps, tables."""
    text = run("dumpe2fs", str(image))
    out: set[int] = set()
    patterns = (
        r"(?:Primary|Backup) superblock at (\d+)()",
        r"Group descriptors? at (\d+)(?:-(\d+))?",
        r"Reserved GDT blocks at (\d+)-(\d+)",
        r"Block bitmap at (\d+)()",
        r"Inode bitmap at (\d+)()",
        r"Inode table at (\d+)-(\d+)",
    )
    for pat in patterns:
        for a, b in re.findall(pat, text):
            out.update(range(int(a), int(b or a) + 1))
    return out


def map_used_per_block(bmap: BlockMap, bs: int, nblocks: int) -> np.ndarray:
    """The map expanded to one bool per filesystem block (clusters repeated)."""
    ratio = bmap.block_size // bs
    bits = np.unpackbits(bmap.bits, bitorder="little")[: bmap.nblocks].astype(bool)
    return np.repeat(bits, ratio)[:nblocks]


def fs_files(image: Path, out: Path) -> dict[str, str]:
    """Every file of an ext image with its SHA-256: mounted read-only via a loop device
    when root (the kernel reads it), else extracted with ``debugfs rdump``."""
    if have_root() and have_tool("losetup"):
        with mounted_ro(image, out) as mnt:
            return tree_sums(mnt)
    out.mkdir()
    run("debugfs", "-R", f"rdump / {out}", str(image))
    return tree_sums(out)


@contextlib.contextmanager
def mounted_ro(image: Path, mnt: Path) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    with loop_device(str(image), read_only=True) as dev:
        run("mount", "-o", "ro", dev, str(mnt))  # read-only device: the image stays untouched
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=False)


@contextlib.contextmanager
def mounted_rw(image: Path, mnt: Path, *opts: str) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    with loop_device(str(image)) as dev:
        run("mount", "-o", ",".join(("rw", *opts)), dev, str(mnt))
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=False)


def e2fsck_clean(image: Path) -> None:
    r = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert r.returncode == 0, f"e2fsck -fn found problems:\n{r.stdout}{r.stderr}"
