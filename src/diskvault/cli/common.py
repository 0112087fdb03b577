"""What every command shares: locations, placeholders, opening the repository."""

from __future__ import annotations

import argparse
import getpass
import os
import re
import signal
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from .. import __version__
from ..crypto.passphrase import check_new_passphrase, get_passphrase
from ..errors import UsageError
from ..repository.lock import EXCLUSIVE, SHARED
from ..repository.repo import Repository
from ..storage.url import mask, open_store
from . import log

READ, WRITE, EXCLUSIVE_LOCK = "read", "write", "exclusive"


def split_location(loc: str | None, need_archive: bool | None) -> tuple[str, str | None]:
    """``REPO::ARCHIVE`` (or ``::ARCHIVE`` with DISKVAULT_REPO) → (repo, archive)."""
    if loc is None or loc == "":
        loc = ""
    repo, sep, archive = loc.partition("::")
    if not repo:
        repo = os.environ.get("DISKVAULT_REPO", "")
        if not repo:
            raise UsageError("no repository given (REPO or REPO::ARCHIVE, or DISKVAULT_REPO)")
    if need_archive is True and not archive:
        raise UsageError(f"an archive name is needed: {mask(repo)}::ARCHIVE")
    if need_archive is False and sep:
        raise UsageError(f"this command takes a repository, not an archive: {mask(loc)}")
    return repo, archive or None


_PLACEHOLDER = re.compile(
    r"\{(now|utcnow|hostname|fqdn|user|pid|uuid4|version)(?::([^}]*))?\}")


def fqdn() -> str:
    """The host's fully qualified name, as Borg finds it: the canonical name of the host
    name. ``socket.getfqdn()`` answers "localhost" on hosts whose name maps to 127.0.1.1
    with "localhost" among its aliases (Debian's /etc/hosts)."""
    name = socket.gethostname()
    try:
        addrs = socket.getaddrinfo(name, None, 0, socket.SOCK_DGRAM, 0, socket.AI_CANONNAME)
    except OSError:
        return name
    return next((a[3] for a in addrs if a[3]), name)


def expand_placeholders(name: str) -> str:
    """Borg's archive-name placeholders; ``{version}`` is Borg's ``{borgversion}``."""
    now = datetime.now()
    values = {
        "now": lambda f: now.strftime(f or "%Y-%m-%dT%H:%M:%S"),
        "utcnow": lambda f: datetime.now(UTC).strftime(f or "%Y-%m-%dT%H:%M:%S"),
        "hostname": lambda f: socket.gethostname().split(".")[0],
        "fqdn": lambda f: fqdn(),
        "user": lambda f: getpass.getuser(),
        "pid": lambda f: str(os.getpid()),
        "uuid4": lambda f: str(uuid.uuid4()),
        "version": lambda f: __version__,
    }
    out = _PLACEHOLDER.sub(lambda m: values[m.group(1)](m.group(2)), name)
    if "{" in out or "}" in out:
        raise UsageError(f"unknown placeholder in archive name {name!r}")
    if not out or "/" in out or out.startswith("-") or any(ord(c) < 32 for c in out):
        raise UsageError(f"invalid archive name {out!r}")
    return out


def passphrase_fn(creating: bool) -> str:
    if creating:
        return check_new_passphrase(get_passphrase("Enter new passphrase: ", confirm=True))
    return get_passphrase("Enter passphrase: ")


def passphrase_is_set() -> bool:
    return (os.environ.get("DISKVAULT_PASSPHRASE") is not None
            or bool(os.environ.get("DISKVAULT_PASSCOMMAND")))


def warn_unencrypted(repo: Repository) -> None:
    """A passphrase set for a repository met unencrypted for the first time: the user
    expects encryption, and whoever holds the storage may have replaced it."""
    if repo.first_contact and repo.encryption == "none" and passphrase_is_set():
        log.warning(f"{repo.store.location} is not encrypted, but a passphrase is set: if "
                    "you created it encrypted, its storage has been tampered with")


@contextmanager
def open_repo(location: str, mode: str = READ, lock_wait: float = 1.0) -> Iterator[Repository]:
    store = open_store(location)
    lock = {READ: SHARED, WRITE: SHARED, EXCLUSIVE_LOCK: EXCLUSIVE}[mode]
    repo = Repository.open(store, passphrase_fn, lock=lock, lock_wait=lock_wait)
    warn_unencrypted(repo)
    try:
        yield repo
    finally:
        repo.close()


def stop_on_signals(stop: Callable[[], None]) -> None:
    """For a command serving on the running event loop until told to stop (serve-nbd,
    instant-restore): SIGINT, SIGTERM and SIGHUP call ``stop`` so that it shuts down
    cleanly. (SIGPIPE stays ignored, as main() leaves it: a client that hangs up while a
    reply is written ends only its own connection.)"""
    import asyncio  # here: the other commands need no event loop, and it costs 15 ms

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop)


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lock-wait", type=float, default=1.0, metavar="SECONDS",
                   help="wait at most this long for a repository lock (default 1)")
    add_rsh(p)


def add_rsh(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rsh", metavar="RSH", help="ssh options for ssh:// and sftp:// "
                   "repositories, like Borg's: 'ssh -i KEY -p PORT -o Option=value' "
                   "(also $DISKVAULT_RSH; options the SFTP backend cannot honour are refused)")


def parse_size(s: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgGtT]?)(i?[bB]?)", s.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {s!r}")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(m.group(1)) * mult


def percent(lo: float, hi: float, lo_ok: bool, hi_ok: bool):
    """An argparse type for ``N%`` (or ``N``) within a range, as a fraction of 1."""

    def parse(s: str) -> float:
        try:
            v = float(s.rstrip("%"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid percentage {s!r}") from None
        if not ((lo <= v if lo_ok else lo < v) and (v <= hi if hi_ok else v < hi)):
            span = f"{'[' if lo_ok else '('}{lo:g}, {hi:g}{']' if hi_ok else ')'}"
            raise argparse.ArgumentTypeError(f"percentage must be in {span}: {s!r}")
        return v / 100

    return parse


def report_warnings(lines: list[str]) -> int:
    """Print each warning as one line on stderr; the exit code: 1 if any (Borg's rule)."""
    for line in lines:
        log.warning(line)
    return 1 if lines else 0
