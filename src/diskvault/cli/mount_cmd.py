"""diskvault mount [--foreground] [-o OPTS] REPO[::ARCHIVE] MOUNTPOINT

Without ``--foreground`` the command forks: the child opens the repository, mounts and
serves; the parent waits on a pipe until the mount is ready (or the child's one error
line), so a script can use the mount point as soon as ``mount`` returns.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import DiskvaultError, MountError, UsageError
from . import log
from .common import READ, add_common, open_repo, split_location

if TYPE_CHECKING:
    from ..archive.namespace import ArchiveTree

_READY, _ERROR, _NOTE = b"R", b"E", b"N"
# -o options of ours; everything else goes to libfuse (allow_other, default_permissions…)
_OWN_OPTIONS = {"cache_size"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mount", help="mount a repository or an archive with FUSE (read-only)")
    add_common(p)
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground (stop with Ctrl-C or diskvault umount)")
    p.add_argument("-o", dest="options", default="", metavar="OPTS",
                   help="comma-separated FUSE options (allow_other, …) and cache_size=MiB "
                   "(chunk cache per archive, default 256)")
    p.add_argument("location", metavar="REPO[::ARCHIVE]")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=run)


def _parse_options(text: str) -> tuple[dict[str, str | bool], int]:
    fuse: dict[str, str | bool] = {}
    cache = 256 << 20
    for opt in filter(None, (o.strip() for o in text.split(","))):
        key, sep, value = opt.partition("=")
        if key == "cache_size":
            if not value.isdigit() or int(value) < 16:
                raise UsageError(f"-o cache_size wants a number of MiB (at least 16): {opt!r}")
            cache = int(value) << 20
        elif key in ("rw", "dev", "suid"):
            raise UsageError(f"-o {key}: diskvault mounts are read-only and nodev,nosuid")
        else:
            fuse[key] = value if sep else True
    return fuse, cache


def run(args: argparse.Namespace) -> int:
    from ..archive.mounting import check_mountpoint

    repo_loc, archive = split_location(args.location, need_archive=None)
    fuse_opts, cache = _parse_options(args.options)
    mountpoint = check_mountpoint(args.mountpoint)
    if args.foreground:
        tty = os.dup(2)
        _stderr_to(lambda line: os.write(tty, line))
        logging.basicConfig(level=logging.INFO, format="diskvault: %(message)s")
        _serve(repo_loc, archive, mountpoint, fuse_opts, cache, args.lock_wait,
               lambda: None, log.info)
        return 0
    return _daemon(repo_loc, archive, mountpoint, fuse_opts, cache, args.lock_wait)


def _daemon(repo_loc: str, archive: str | None, mountpoint: str,
            fuse_opts: dict[str, str | bool], cache: int, lock_wait: float) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:  # the parent: relay notes, then the child's verdict
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            for line in r:
                kind, text = line[:1], line[1:].decode(errors="replace").rstrip("\n")
                if kind == _NOTE:
                    log.relay(text)  # the child's notes, and its stderr lines
                elif kind == _READY:
                    return 0
                elif kind == _ERROR:
                    os.waitpid(pid, 0)
                    raise MountError(text)
        os.waitpid(pid, 0)
        raise MountError(f"mounting {mountpoint} failed (the mount process ended)")
    os.close(rfd)
    os.setsid()
    code = 0
    # the caller's stdout/stderr may be pipes it reads to the end: hold none of them
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1)
    os.close(null)

    lock = threading.Lock()
    pipe: list[int] = [wfd]  # emptied by ready(): a closed fd number may be reused

    def send(kind: bytes, text: str = "") -> None:
        with lock:
            if pipe:
                try:
                    os.write(pipe[0], kind + text.replace("\n", " ").encode() + b"\n")
                except OSError:
                    pass

    _stderr_to(lambda line: send(_NOTE, line.decode(errors="replace").rstrip("\n")))

    def ready() -> None:
        send(_READY)
        with lock:
            os.close(pipe.pop())
        # detached from here on: nothing may write to the caller's terminal
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)

    try:
        _serve(repo_loc, archive, mountpoint, fuse_opts, cache, lock_wait, ready,
               lambda msg: send(_NOTE, msg))
    except DiskvaultError as e:
        send(_ERROR, str(e))
        code = 2
    except BaseException as e:  # noqa: BLE001 - the child must never return into the CLI
        send(_ERROR, f"internal error: {type(e).__name__}: {e}")
        code = 2
    os._exit(code)


# libfuse 3.14 prints a bogus warning for the old fuse_main_real entry point mfusepy calls
_LIBFUSE_NOISE = b"Ignoring invalid max threads value"


def _stderr_to(forward: Callable[[bytes], object]) -> None:
    """Make fd 2 a pipe whose lines (libfuse's, ours) go to ``forward``, less the noise.
    The pump ends when fd 2 stops being the pipe (a daemon's ready())."""
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)

    def pump() -> None:
        with os.fdopen(r, "rb") as src:
            for line in src:
                if _LIBFUSE_NOISE not in line:
                    forward(line)

    threading.Thread(target=pump, name="stderr", daemon=True).start()


def _serve(repo_loc: str, archive: str | None, mountpoint: str,
           fuse_opts: dict[str, str | bool], cache: int, lock_wait: float,
           ready: Callable[[], None], note: Callable[[str], None]) -> None:
    from ..archive.mountfs import DiskvaultFS, RepoTree, SparseFUSE
    from ..archive.mounting import mount_kernel_trees

    def kernel_trees(prefix: str, tree: ArchiveTree) -> None:
        mount_kernel_trees(mountpoint, prefix, tree, note)

    with open_repo(repo_loc, READ, lock_wait) as repo:
        if archive is not None:
            repo.archive_ref(archive)  # a missing archive: one error line, nothing mounted
        # one archive: its kernel mounts are made before mount returns; a whole repository:
        # each archive's when its folder is first opened (they appear a moment later)
        rt = RepoTree(repo, archive, cache, note, None if archive else kernel_trees)
        first = rt.tree(archive) if archive is not None else None

        def on_ready() -> None:
            if first is not None:
                kernel_trees("", first)
            ready()

        ops = DiskvaultFS(rt, on_ready)
        opts = {"ro": True, "nodev": True, "nosuid": True, "fsname": "diskvault",
                "subtype": "diskvault", "default_permissions": True, "kernel_cache": True,
                "entry_timeout": "300", "attr_timeout": "300", "max_threads": "16",
                **fuse_opts}
        try:
            SparseFUSE(ops, mountpoint, foreground=True, **opts)
        except RuntimeError as e:
            raise MountError(f"cannot mount {mountpoint}: libfuse failed ({e})") from None
        finally:
            rt.close()
