"""diskvault serve-nbd [--bind ADDR] [--port N | --socket PATH] REPO::ARCHIVE [ITEM]"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os

from ..archive.reader import DEFAULT_CACHE_BYTES, open_archive_readers
from ..errors import UsageError
from ..serve.nbd import Export, NbdServer
from . import log
from .common import READ, add_common, open_repo, parse_size, split_location, stop_on_signals

DEFAULT_PORT = 10809


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-nbd", help="serve an archive's disk or items read-only over NBD")
    add_common(p)
    p.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                   help="address to listen on (default 127.0.0.1; anything else is "
                   "reachable from other hosts: no authentication, no encryption)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    where.add_argument("--socket", metavar="PATH", help="listen on a Unix socket instead")
    p.add_argument("--cache-size", type=parse_size, default=DEFAULT_CACHE_BYTES, metavar="SIZE",
                   help="memory for decompressed chunks (default 256M)")
    p.add_argument("location", metavar="REPO::ARCHIVE")
    p.add_argument("item", nargs="?", metavar="ITEM",
                   help="default export (default: the whole disk of a disk archive, or the "
                   "archive's only item); every item is an export by its path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    repo_loc, name = split_location(args.location, need_archive=True)
    if args.socket is None and not 0 <= args.port <= 65535:
        raise UsageError(f"invalid port {args.port}")
    with open_repo(repo_loc, READ, args.lock_wait) as repo, \
            open_archive_readers(repo, name or "", cache_bytes=args.cache_size) as ar:
        readers = ar.exports()
        if not readers:
            raise UsageError(f"archive {name!r} has no item with content to serve")
        default = None
        if args.item is not None:
            default = ar.get(args.item).path
        elif (d := ar.default()) is not None:
            default = d.path
        exports = [Export(n, r, f"{name}: {n}") for n, r in readers.items()]
        server = NbdServer(exports, default, log=lambda msg: log.info(f"serve-nbd: {msg}"))
        if args.socket is None and not _is_loopback(args.bind):
            log.warning(f"serving {name!r} on {args.bind} to anyone who can reach it: NBD "
                        "has no authentication or encryption")
        asyncio.run(_serve(server, args))
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _serve(server: NbdServer, args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    stop_on_signals(stop.set)
    try:
        if args.socket is not None:
            path = os.path.abspath(args.socket)
            await server.listen_unix(path)
            uri = f"nbd+unix:///?socket={path}"
        else:
            try:
                host, port = await server.listen_tcp(args.bind, args.port)
            except OSError as e:
                raise UsageError(f"cannot listen on {args.bind}:{args.port}: {e.strerror}") \
                    from None
            uri = f"nbd://[{host}]:{port}" if ":" in host else f"nbd://{host}:{port}"
        # the URI on stdout tells scripts (and tests) that the server is ready
        print(uri, flush=True)
        await stop.wait()
    finally:
        await server.close()  # removes our socket file too
