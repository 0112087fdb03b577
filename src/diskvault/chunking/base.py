"""Chunkers: split an item's content into chunks. One interface, two algorithms.

``fixed,SIZE[,HEADER]``: boundaries at HEADER + k × SIZE of the item, whatever holes or
unused runs lie between — a seekable item is cut into windows without reading it,
so dedup survives changes in free space. Default for devices, images and files.
``fastcdc,MIN,AVG,MAX``: content-defined, for streams whose content shifts
(``ntfsclone -so -`` output, tar streams). Default for stdin.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import UsageError

MiB = 1 << 20
MAX_CHUNK = 64 * MiB

StreamRead = Callable[[int], bytes]  # read(n) → up to n bytes; b"" at the end


@dataclass(frozen=True)
class ChunkerParams:
    algo: str
    size: int = 4 * MiB  # fixed: window size
    header: int = 0  # fixed: size of a first, separate chunk
    min: int = 0
    avg: int = 0
    max: int = 0

    @classmethod
    def parse(cls, spec: str) -> ChunkerParams:
        parts = spec.split(",")
        try:
            nums = [int(p) for p in parts[1:]]
        except ValueError:
            raise UsageError(f"invalid chunker params {spec!r}: sizes must be integers") from None
        if parts[0] == "fixed" and len(nums) in (1, 2):
            size, header = nums[0], (nums[1] if len(nums) == 2 else 0)
            if not 4096 <= size <= MAX_CHUNK or not 0 <= header <= MAX_CHUNK:
                raise UsageError(f"invalid chunker params {spec!r}: size 4096..{MAX_CHUNK}")
            return cls("fixed", size=size, header=header)
        if parts[0] == "fastcdc" and len(nums) == 3:
            lo, avg, hi = nums
            # the limits of the FastCDC implementation (pyfastcdc)
            if not (64 <= lo <= MiB and 256 <= avg <= 4 * MiB and 1024 <= hi <= 16 * MiB
                    and lo <= avg <= hi):
                raise UsageError(f"invalid chunker params {spec!r}: need MIN<=AVG<=MAX, "
                                 "MIN<=1MiB, AVG<=4MiB, MAX<=16MiB")
            return cls("fastcdc", min=lo, avg=avg, max=hi)
        raise UsageError(f"invalid chunker params {spec!r}: use fixed,SIZE[,HEADER] or "
                         "fastcdc,MIN,AVG,MAX")

    def __str__(self) -> str:
        if self.algo == "fixed":
            return f"fixed,{self.size}" + (f",{self.header}" if self.header else "")
        return f"fastcdc,{self.min},{self.avg},{self.max}"


DEFAULT_SEEKABLE = ChunkerParams("fixed", size=4 * MiB)
DEFAULT_STREAM = ChunkerParams("fastcdc", min=512 * 1024, avg=2 * MiB, max=8 * MiB)


class Chunker(ABC):
    #: True when boundaries depend only on offsets (windows() may be used)
    fixed: bool = False

    def windows(self, size: int) -> Iterator[tuple[int, int]]:
        raise NotImplementedError

    @abstractmethod
    def chunks(self, read: StreamRead) -> Iterator[bytes]:
        """Cut a stream into chunks (each a fresh bytes object)."""


def make_chunker(params: ChunkerParams, seed: int = 0) -> Chunker:
    """``seed``: the repository's secret FastCDC seed (0: the public gear table)."""
    if params.algo == "fixed":
        from .fixed import FixedChunker

        return FixedChunker(params.size, params.header)
    from .fastcdc import FastCdcChunker

    return FastCdcChunker(params.min, params.avg, params.max, seed)


def read_full(read: StreamRead, n: int) -> bytes:
    """Read until ``n`` bytes or the end of the stream."""
    parts, got = [], 0
    while got < n:
        b = read(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return parts[0] if len(parts) == 1 else b"".join(parts)
