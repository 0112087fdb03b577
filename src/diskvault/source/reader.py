"""Random access to a byte range of a file or device (a partition inside a disk image)."""

from __future__ import annotations

import os


class FileRangeReader:
    """``pread`` relative to ``offset`` within an open file descriptor, clipped to ``size``."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self.fd = fd
        self.offset = offset
        self.size = size

    def pread(self, offset: int, size: int) -> bytes:
        if offset >= self.size or size <= 0:
            return b""
        size = min(size, self.size - offset)
        out = bytearray()
        while len(out) < size:
            got = os.pread(self.fd, size - len(out), self.offset + offset + len(out))
            if not got:
                break
            out += got
        return bytes(out)

    @classmethod
    def open(cls, path: str, offset: int = 0, size: int | None = None) -> FileRangeReader:
        fd = os.open(path, os.O_RDONLY)
        if size is None:
            size = os.lseek(fd, 0, os.SEEK_END) - offset
        return cls(fd, offset, size)

    def close(self) -> None:
        os.close(self.fd)
