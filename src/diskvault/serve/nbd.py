"""A read-only NBD server (fixed newstyle) over the archive view.

Protocol: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md. What is
spoken here: options EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY,
LIST_META_CONTEXT and SET_META_CONTEXT (context ``base:allocation``); commands READ,
BLOCK_STATUS, DISC, FLUSH and CACHE (both no-ops on a read-only export); WRITE, TRIM and
WRITE_ZEROES are refused with EPERM. With structured replies a READ answers zero and
unused runs as holes, and BLOCK_STATUS reports them as ``HOLE|ZERO``, so clients such as
``nbdcopy`` and ``qemu-img convert`` skip them without reading.

One asyncio loop serves every connection; reads run on a thread pool (the view is
thread-safe and its chunk fetches release the GIL), so a client with many requests in
flight is answered out of order, as the protocol allows. Each reply is written with a
single ``write`` call, which keeps replies of concurrent requests from interleaving.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import struct
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..archive.reader import ItemReader
from ..errors import DiskvaultError, UsageError

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
# transmission flags
HAS_FLAGS, READ_ONLY, SEND_FLUSH, SEND_DF, CAN_MULTI_CONN, SEND_CACHE = 1, 2, 4, 128, 256, 1024

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10

REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = (1 << 31) | 1, (1 << 31) | 2, (1 << 31) | 3
REP_ERR_UNKNOWN, REP_ERR_TOO_BIG = (1 << 31) | 6, (1 << 31) | 9
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE = 0, 1, 2, 3, 4, 5
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
CMD_FLAG_DF, CMD_FLAG_REQ_ONE = 1 << 2, 1 << 3

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE = 0, 1, 2
REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR = 5, (1 << 15) | 1
STATE_HOLE, STATE_ZERO = 1, 2

EPERM, EIO, EINVAL, EOVERFLOW, ENOTSUP = 1, 5, 22, 75, 95

BASE_ALLOCATION = "base:allocation"
CONTEXT_ID = 1
MAX_OPTION = 64 << 10  # option data larger than this is no honest client's
MAX_REQUEST = 32 << 20  # largest READ (advertised as the maximum block size)
PREFERRED_BLOCK = 64 << 10
MAX_INFLIGHT = 32  # requests of one connection being served at once (bounds memory)
MAX_DESCRIPTORS = 1 << 16
INLINE_READ = 256 << 10  # cached reads up to this size are answered on the event loop


class _Abort(Exception):
    """The client broke the protocol or went away: drop the connection."""


class Export:
    def __init__(self, name: str, reader: ItemReader, description: str = "") -> None:
        self.name = name
        self.reader = reader
        self.description = description


class NbdServer:
    """Serves named exports; ``default`` is what the empty export name means."""

    def __init__(self, exports: list[Export], default: str | None, threads: int = 8,
                 log: Callable[[str], None] | None = None) -> None:
        self.exports = {e.name: e for e in exports}
        self.default = default
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="nbd-read")
        self.log = log or (lambda msg: print(f"diskvault: serve-nbd: {msg}", file=sys.stderr,
                                             flush=True))
        self._servers: list[asyncio.AbstractServer] = []
        self._sockets: list[str] = []  # socket files we created, removed by close()
        self._conns: set[asyncio.Task] = set()

    def lookup(self, name: str) -> Export | None:
        if name == "" and self.default is not None:
            name = self.default
        return self.exports.get(name) or self.exports.get(name.strip("/"))

    # --- listening ----------------------------------------------------------------

    async def listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        srv = await asyncio.start_server(self._client, host, port, reuse_address=True,
                                         limit=1 << 16)
        self._servers.append(srv)
        addr = srv.sockets[0].getsockname()
        return addr[0], addr[1]

    async def listen_unix(self, path: str) -> None:
        _clear_stale_socket(path)
        srv = await asyncio.start_unix_server(self._client, path, limit=1 << 16)
        self._servers.append(srv)
        self._sockets.append(path)

    async def close(self) -> None:
        """Stop listening, end every connection, and remove the socket files we made
        (Python before 3.13 leaves them; a stale one is also cleared by the next server)."""
        for s in self._servers:
            s.close()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        for s in self._servers:
            await s.wait_closed()
        self.pool.shutdown(wait=True, cancel_futures=True)
        for path in self._sockets:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._sockets.clear()

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        with contextlib.suppress(OSError):
            sock = w.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn = _Connection(self, r, w)
            await conn.run()
        except (_Abort, asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        except Exception as e:  # noqa: BLE001 - a bug: this connection ends, others go on
            self.log(f"internal error: {type(e).__name__}: {e}")
        finally:
            self._conns.discard(task)
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()


class _Connection:
    def __init__(self, server: NbdServer, r: asyncio.StreamReader,
                 w: asyncio.StreamWriter) -> None:
        self.srv = server
        self.r = r
        self.w = w
        self.structured = False
        self.meta_export: str | None = None  # base:allocation was set for this export
        self.no_zeroes = False

    async def run(self) -> None:
        self.w.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                                 FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", await self.r.readexactly(4))
        if cflags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) or not cflags & FLAG_FIXED_NEWSTYLE:
            raise _Abort
        self.no_zeroes = bool(cflags & FLAG_NO_ZEROES)
        export = await self.negotiate()
        if export is not None:
            await Transmission(self, export).run()

    # --- option haggling -----------------------------------------------------------

    async def negotiate(self) -> Export | None:
        while True:
            magic, opt, length = struct.unpack(">QII", await self.r.readexactly(16))
            if magic != IHAVEOPT:
                raise _Abort
            if length > MAX_OPTION:
                raise _Abort
            data = await self.r.readexactly(length)
            if opt == OPT_EXPORT_NAME:
                export = self.srv.lookup(data.decode("utf-8", "replace"))
                if export is None:
                    raise _Abort  # the only answer EXPORT_NAME allows
                tail = b"" if self.no_zeroes else bytes(124)
                self.w.write(struct.pack(">QH", export.reader.size, self.tflags()) + tail)
                return export
            if opt == OPT_ABORT:
                await self.reply(opt, REP_ACK)
                return None
            if opt in (OPT_INFO, OPT_GO):
                export = await self.info(opt, data)
                if export is not None and opt == OPT_GO:
                    return export
            elif opt == OPT_LIST:
                await self.list(opt, data)
            elif opt == OPT_STRUCTURED_REPLY:
                if data:
                    await self.error(opt, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
                else:
                    self.structured = True
                    await self.reply(opt, REP_ACK)
            elif opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
                await self.meta_context(opt, data)
            else:
                await self.error(opt, REP_ERR_UNSUP, f"option {opt} is not supported")

    def tflags(self) -> int:
        f = HAS_FLAGS | READ_ONLY | SEND_FLUSH | CAN_MULTI_CONN | SEND_CACHE
        return f | SEND_DF if self.structured else f

    async def reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self.w.write(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, rtype, len(data)) + data)
        await self.w.drain()

    async def error(self, opt: int, rtype: int, msg: str) -> None:
        await self.reply(opt, rtype, msg.encode()[:4096])

    async def list(self, opt: int, data: bytes) -> None:
        if data:
            await self.error(opt, REP_ERR_INVALID, "LIST takes no data")
            return
        for e in self.srv.exports.values():
            name = e.name.encode()
            await self.reply(opt, REP_SERVER,
                             struct.pack(">I", len(name)) + name + e.description.encode())
        await self.reply(opt, REP_ACK)

    async def info(self, opt: int, data: bytes) -> Export | None:
        try:
            name, rest = _string(data, 0)
            (n,) = struct.unpack_from(">H", data, rest)
            wanted = struct.unpack_from(f">{n}H", data, rest + 2)
            if rest + 2 + 2 * n != len(data):
                raise ValueError
        except (ValueError, struct.error):
            await self.error(opt, REP_ERR_INVALID, "malformed INFO/GO request")
            return None
        export = self.srv.lookup(name)
        if export is None:
            await self.error(opt, REP_ERR_UNKNOWN, self.unknown(name))
            return None
        size = export.reader.size
        await self.reply(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, size, self.tflags()))
        if INFO_NAME in wanted:
            await self.reply(opt, REP_INFO, struct.pack(">H", INFO_NAME) + export.name.encode())
        if INFO_DESCRIPTION in wanted and export.description:
            await self.reply(opt, REP_INFO, struct.pack(">H", INFO_DESCRIPTION)
                             + export.description.encode())
        await self.reply(opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1,
                                                    PREFERRED_BLOCK, MAX_REQUEST))
        await self.reply(opt, REP_ACK)
        if opt == OPT_GO and self.meta_export not in (None, export.name):
            self.meta_export = None  # contexts were set for another export
        return export

    def unknown(self, name: str) -> str:
        if name == "":
            return ("this archive has several items and no default export: name one of "
                    + ", ".join(self.srv.exports))
        return f"no export {name!r} (exports: {', '.join(self.srv.exports)})"

    async def meta_context(self, opt: int, data: bytes) -> None:
        if not self.structured:
            await self.error(opt, REP_ERR_INVALID, "negotiate structured replies first")
            return
        try:
            name, pos = _string(data, 0)
            (n,) = struct.unpack_from(">I", data, pos)
            pos += 4
            queries = []
            for _ in range(n):
                q, pos = _string(data, pos)
                queries.append(q)
            if pos != len(data):
                raise ValueError
        except (ValueError, struct.error):
            await self.error(opt, REP_ERR_INVALID, "malformed META_CONTEXT request")
            return
        export = self.srv.lookup(name)
        if export is None:
            await self.error(opt, REP_ERR_UNKNOWN, self.unknown(name))
            return
        if opt == OPT_SET_META_CONTEXT:
            self.meta_export = None
        listing = opt == OPT_LIST_META_CONTEXT
        if any(q == BASE_ALLOCATION or (listing and q == "base:") for q in queries) or (
                listing and not queries):
            await self.reply(opt, REP_META_CONTEXT,
                             struct.pack(">I", CONTEXT_ID) + BASE_ALLOCATION.encode())
            if not listing:
                self.meta_export = export.name
        await self.reply(opt, REP_ACK)


def _string(data: bytes, pos: int) -> tuple[str, int]:
    """A u32-length-prefixed UTF-8 string at ``pos``; returns it and the next position."""
    (n,) = struct.unpack_from(">I", data, pos)
    if n > 4096 or pos + 4 + n > len(data):
        raise ValueError
    return data[pos + 4 : pos + 4 + n].decode("utf-8"), pos + 4 + n


class Transmission:
    """The command phase of one connection."""

    def __init__(self, conn: _Connection, export: Export) -> None:
        self.c = conn
        self.export = export
        self.reader = export.reader
        self.meta = conn.meta_export == export.name
        self.inflight = asyncio.Semaphore(MAX_INFLIGHT)
        self.tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        try:
            while True:
                magic, flags, cmd, cookie, offset, length = struct.unpack(
                    ">IHHQQI", await self.c.r.readexactly(28))
                if magic != REQUEST_MAGIC:
                    raise _Abort
                if cmd == CMD_DISC:
                    break
                if cmd == CMD_WRITE:
                    if length > MAX_REQUEST:
                        raise _Abort  # cannot skip the payload safely
                    await self.c.r.readexactly(length)
                if cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
                    self.simple(cookie, EPERM)
                elif cmd in (CMD_FLUSH, CMD_CACHE):
                    self.simple(cookie, 0)  # read-only: nothing to flush or to warm
                elif cmd in (CMD_READ, CMD_BLOCK_STATUS):
                    await self.inflight.acquire()
                    t = asyncio.create_task(self.serve(cmd, flags, cookie, offset, length))
                    self.tasks.add(t)
                    t.add_done_callback(self._done)
                else:
                    self.simple(cookie, EINVAL)
                await self.c.w.drain()
        finally:
            if self.tasks:  # answer what was asked before the disconnect
                await asyncio.gather(*self.tasks, return_exceptions=True)

    def _done(self, t: asyncio.Task) -> None:
        self.tasks.discard(t)
        self.inflight.release()

    def simple(self, cookie: int, err: int, data: bytes = b"") -> None:
        self.c.w.write(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, err, cookie) + data)

    def chunk(self, cookie: int, rtype: int, payload: bytes, done: bool) -> bytes:
        return struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                           rtype, cookie, len(payload)) + payload

    def fail(self, cookie: int, err: int, msg: str) -> None:
        if self.c.structured:
            m = msg.encode()[:4096]
            self.c.w.write(self.chunk(cookie, REPLY_TYPE_ERROR,
                                      struct.pack(">IH", err, len(m)) + m, True))
        else:
            self.simple(cookie, err)

    async def serve(self, cmd: int, flags: int, cookie: int, offset: int, length: int) -> None:
        size = self.reader.size
        if length == 0 or offset + length > size:
            self.fail(cookie, EINVAL, f"range {offset}+{length} is outside the export "
                      f"({size} bytes)")
        elif cmd == CMD_READ and length > MAX_REQUEST:
            self.fail(cookie, EOVERFLOW, f"read of {length} bytes is over {MAX_REQUEST}")
        elif cmd == CMD_BLOCK_STATUS and not self.meta:
            self.fail(cookie, EINVAL, "no metadata context was negotiated")
        else:
            loop = asyncio.get_running_loop()
            fn = self.read_reply if cmd == CMD_READ else self.status_reply
            # a lone small read served from memory skips the hop to a thread, the larger
            # part of its cost; with more requests in flight the threads overlap them
            inline = cmd == CMD_BLOCK_STATUS or (
                len(self.tasks) <= 1 and length <= INLINE_READ
                and self.reader.cached(offset, length))
            try:
                if inline:
                    out = fn(flags, cookie, offset, length)
                else:
                    out = await loop.run_in_executor(self.c.srv.pool, fn, flags, cookie,
                                                     offset, length)
            except DiskvaultError as e:
                self.c.srv.log(f"{self.export.name}: {e}")
                self.fail(cookie, EIO, str(e))
            except Exception as e:  # noqa: BLE001 - a bug: answer it, keep serving
                self.c.srv.log(f"{self.export.name}: internal error: {type(e).__name__}: {e}")
                self.fail(cookie, EIO, "internal error")
            else:
                self.c.w.write(out)
        with contextlib.suppress(ConnectionError):
            await self.c.w.drain()

    def read_reply(self, flags: int, cookie: int, offset: int, length: int) -> bytes:
        """The whole reply to a READ (runs on the pool): holes for zero/unused runs."""
        if not self.c.structured:
            data = self.reader.read(offset, length)
            return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, cookie) + data
        if flags & CMD_FLAG_DF:
            runs = [(offset, length, "data")]
        else:
            runs = list(self.reader.extents(offset, length))
        parts = []
        for i, (off, n, kind) in enumerate(runs):
            last = i == len(runs) - 1
            if kind == "data":
                payload = struct.pack(">Q", off) + self.reader.read(off, n)
                parts.append(self.chunk(cookie, REPLY_TYPE_OFFSET_DATA, payload, last))
            else:
                parts.append(self.chunk(cookie, REPLY_TYPE_OFFSET_HOLE,
                                        struct.pack(">QI", off, n), last))
        return b"".join(parts)

    def status_reply(self, flags: int, cookie: int, offset: int, length: int) -> bytes:
        desc: list[list[int]] = []  # [length, flags], neighbours of equal flags merged
        for _, n, kind in self.reader.extents(offset, length):
            st = 0 if kind == "data" else STATE_HOLE | STATE_ZERO
            if desc and desc[-1][1] == st:
                desc[-1][0] += n
            else:
                if len(desc) >= MAX_DESCRIPTORS or (desc and flags & CMD_FLAG_REQ_ONE):
                    break
                desc.append([n, st])
        payload = struct.pack(">I", CONTEXT_ID) + b"".join(
            struct.pack(">II", n, st) for n, st in desc)
        return self.chunk(cookie, REPLY_TYPE_BLOCK_STATUS, payload, True)


def _clear_stale_socket(path: str) -> None:
    """Remove a socket left by a server that is gone; refuse a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: left by a killed server
        return
    finally:
        s.close()
    raise UsageError(f"{path}: another server is listening on this socket")
