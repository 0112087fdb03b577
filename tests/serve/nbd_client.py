"""A minimal blocking NBD client for tests and the benchmark: raw protocol access that
the Debian clients do not give (writes, exact error numbers, pipelined reads)."""

from __future__ import annotations

import socket
import struct
from urllib.parse import urlparse

NBDMAGIC, IHAVEOPT = 0x4E42444D41474943, 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 7, 8, 10
REQUEST_MAGIC, SIMPLE_MAGIC, STRUCTURED_MAGIC = 0x25609513, 0x67446698, 0x668E33EF
CMD_READ, CMD_WRITE, CMD_DISC, CMD_BLOCK_STATUS = 0, 1, 2, 7


class NbdError(Exception):
    def __init__(self, errno: int, msg: str = "") -> None:
        super().__init__(f"NBD error {errno}: {msg}")
        self.errno = errno
        self.msg = msg


class Client:
    def __init__(self, uri: str, export: str = "", structured: bool = True) -> None:
        u = urlparse(uri)
        if u.scheme == "nbd+unix":
            self.s = socket.socket(socket.AF_UNIX)
            self.s.connect(u.query.split("socket=", 1)[1])
        else:
            self.s = socket.create_connection((u.hostname, u.port or 10809), timeout=120)
            self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.s.makefile("rb")
        magic, opt, flags = struct.unpack(">QQH", self._read(18))
        assert magic == NBDMAGIC and opt == IHAVEOPT and flags & 1
        self.s.sendall(struct.pack(">I", 1 | 2))
        self.structured = False
        if structured:
            self._option(OPT_STRUCTURED_REPLY, b"")
            self.structured = True
            name = export.encode()
            q = b"base:allocation"
            self._option(OPT_SET_META_CONTEXT, struct.pack(">I", len(name)) + name
                         + struct.pack(">II", 1, len(q)) + q)
        name = export.encode()
        replies = self._option(OPT_GO, struct.pack(">I", len(name)) + name + b"\0\0")
        for rtype, data in replies:
            if rtype == 3 and struct.unpack_from(">H", data)[0] == 0:
                self.size, self.flags = struct.unpack_from(">QH", data, 2)
        self.cookie = 0

    def _read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise ConnectionError("server closed the connection")
        return b

    def _option(self, opt: int, data: bytes) -> list[tuple[int, bytes]]:
        self.s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
        out = []
        while True:
            magic, o, rtype, n = struct.unpack(">QIII", self._read(20))
            assert magic == OPT_REPLY_MAGIC and o == opt
            payload = self._read(n)
            if rtype & (1 << 31):
                raise NbdError(rtype & 0xFFFF, payload.decode(errors="replace"))
            if rtype == 1:
                return out
            out.append((rtype, payload))

    def send(self, cmd: int, offset: int, length: int, data: bytes = b"", flags: int = 0
             ) -> int:
        self.cookie += 1
        self.s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, self.cookie, offset,
                                   length) + data)
        return self.cookie

    def reply(self, read_len: dict[int, tuple[int, int]] | None = None
              ) -> tuple[int, bytes | list | None]:
        """One complete reply: (cookie, data for reads / descriptors for status); raises
        NbdError with the error number on an error reply."""
        magic = struct.unpack(">I", self._read(4))[0]
        if magic == SIMPLE_MAGIC:
            err, cookie = struct.unpack(">IQ", self._read(12))
            if err:
                raise NbdError(err)
            if read_len and cookie in read_len:
                return cookie, self._read(read_len[cookie][1])
            return cookie, None
        assert magic == STRUCTURED_MAGIC
        buf: bytearray | None = None
        status: list | None = None
        first = True
        while True:
            if not first:
                assert struct.unpack(">I", self._read(4))[0] == STRUCTURED_MAGIC
            first = False
            flags, rtype, cookie, n = struct.unpack(">HHQI", self._read(16))
            payload = self._read(n)
            if rtype & (1 << 15):
                err, mlen = struct.unpack_from(">IH", payload)
                raise NbdError(err, payload[6 : 6 + mlen].decode(errors="replace"))
            if rtype in (1, 2):
                base, length = read_len[cookie] if read_len else (0, 0)
                if buf is None:
                    buf = bytearray(length)
                (off,) = struct.unpack_from(">Q", payload)
                if rtype == 1:
                    buf[off - base : off - base + n - 8] = payload[8:]
            elif rtype == 5:
                status = [struct.unpack_from(">II", payload, 4 + 8 * i)
                          for i in range((n - 4) // 8)]
            if flags & 1:
                return cookie, bytes(buf) if buf is not None else status

    def pread(self, offset: int, length: int) -> bytes:
        c = self.send(CMD_READ, offset, length)
        _, data = self.reply({c: (offset, length)})
        assert isinstance(data, bytes)
        return data

    def close(self) -> None:
        try:
            self.send(CMD_DISC, 0, 0)
        finally:
            self.f.close()
            self.s.close()
