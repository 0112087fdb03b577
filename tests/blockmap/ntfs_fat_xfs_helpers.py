"""Shared by the NTFS, FAT and XFS block-map tests: images full of stale data, reference
maps from partclone's domain log, and file trees to hash."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator

import numpy as np

from diskvault.blockmap.base import BlockMap
from diskvault.source.reader import FileRangeReader


class MemReader:
    """A RangeReader over bytes in memory (mutable, for damage tests)."""

    def __init__(self, buf: bytes | bytearray) -> None:
        self.buf, self.size = buf, len(buf)

    def pread(self, offset: int, size: int) -> bytes:
        return bytes(self.buf[offset : offset + size])


def prefill(path: str, size: int, seed: int = 0) -> None:
    """Create ``path`` of ``size`` bytes of non-zero pseudo-random data.

    A 4 MiB random pattern with a per-block counter keeps this fast (no urandom for
    hundreds of MiB) while no 512-byte block is zero or equal to any test file's data.
    """
    rng = np.random.default_rng(seed)
    pattern = bytearray(rng.bytes(4 << 20))
    with open(path, "wb") as f:
        for i in range(0, size, len(pattern)):
            pattern[:8] = i.to_bytes(8, "little")
            f.write(pattern[: min(len(pattern), size - i)])


def remove_images(directory: str) -> None:
    """Delete the (dense, hundreds of MiB) images a test made: pytest keeps the temp
    dirs of the last runs, and other test sessions share the disk."""
    for dirpath, _dirs, names in os.walk(directory):
        for n in names:
            if n.endswith(".img"):
                os.remove(os.path.join(dirpath, n))


def write_files(root: str, seed: int, count: int, max_size: int) -> dict[str, str]:
    """Random files (some tiny, some large) under ``root``; returns relpath -> sha256."""
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    os.makedirs(os.path.join(root, "sub", "deeper"), exist_ok=True)
    for i in range(count):
        rel = ["", "sub", os.path.join("sub", "deeper")][i % 3]
        size = int(rng.integers(0, 600)) if i % 5 == 0 else int(rng.integers(1, max_size))
        data = rng.bytes(size)
        name = os.path.join(rel, f"file{i:03d}.bin")
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def delete_some(root: str, files: dict[str, str], every: int = 3) -> None:
    """Delete every ``every``-th file, so free space holds stale file data."""
    for i, name in enumerate(sorted(files)):
        if i % every == 1:
            os.remove(os.path.join(root, name))
            del files[name]


def tree_hashes(root: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            if rel.startswith("lost+found"):
                continue
            with open(p, "rb") as f:
                out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def build_map(module, path: str, size: int | None = None) -> BlockMap:  # noqa: ANN001
    reader = FileRangeReader.open(path, 0, size)
    try:
        return module.build(reader)
    finally:
        reader.close()


def used_blocks(bmap: BlockMap, unit: int) -> np.ndarray:
    """One bool per ``unit`` bytes (tests only: images are small)."""
    out = np.zeros(bmap.size // unit, dtype=bool)
    for off, length in bmap.used_ranges(0, bmap.size):
        out[off // unit : (off + length + unit - 1) // unit] = True
    return out


def partclone_used(tool: str, image: str, unit: int, workdir: str) -> np.ndarray:
    """The blocks ``partclone.<fs> -D`` (ddrescue domain log) reports as used."""
    dom = os.path.join(workdir, os.path.basename(image) + ".domain")
    subprocess.run([tool, "-D", "-q", "-s", image, "-o", dom], check=True,
                   capture_output=True)
    out = np.zeros(os.path.getsize(image) // unit, dtype=bool)
    with open(dom) as f:
        for line in f:
            parts = line.split()
            if line.startswith("#") or len(parts) != 3 or parts[2] != "+":
                continue
            off, length = int(parts[0], 16), int(parts[1], 16)
            out[off // unit : (off + length + unit - 1) // unit] = True
    return out


def stale_fraction(image: str, bmap: BlockMap) -> float:
    """Share of the map's free bytes that hold non-zero data in ``image``: proves the
    restore below really had something to lose."""
    free = nonzero = 0
    with open(image, "rb") as f:
        pos = 0
        for off, length in bmap.used_ranges(0, bmap.size) + [(bmap.size, 0)]:
            if off > pos:
                f.seek(pos)
                gap = np.frombuffer(f.read(off - pos), dtype=np.uint8)
                free += len(gap) // 512
                nonzero += int(gap[: len(gap) // 512 * 512].reshape(-1, 512).any(axis=1).sum())
            pos = off + length
    return nonzero / free if free else 0.0


@contextlib.contextmanager
def mounted(dev: str, mnt: str, *args: str, fuse: bool = False) -> Iterator[str]:
    """Mount ``dev`` on ``mnt`` (``mount`` or ``ntfs-3g``); always unmount afterwards."""
    os.makedirs(mnt, exist_ok=True)
    cmd = ["ntfs-3g", *args, dev, mnt] if fuse else ["mount", *args, dev, mnt]
    subprocess.run(cmd, check=True, capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=False, capture_output=True)
