"""SFTP backend on paramiko: one SSH connection, a small pool of SFTP channels.

Why not borgstore's sftp backend: it drives one SFTP channel, which paramiko does not
allow from several threads at once; it neither fsyncs nor lists recursively, and it
refuses unknown host keys without a way to accept them for tests.

Authentication and host lookup follow OpenSSH: ``~/.ssh/config`` (HostName, User,
Port, IdentityFile, ProxyCommand, UserKnownHostsFile, StrictHostKeyChecking), the SSH
agent, default identities, and ``~/.ssh/known_hosts``. An unknown host key is refused
unless ``StrictHostKeyChecking accept-new`` (or ``no``) is configured for the host or
``DISKVAULT_SFTP_ACCEPT_NEW_HOSTKEY=1`` is set; accepted keys are added to
``~/.ssh/known_hosts``. A changed host key is always refused.

A store writes ``<name>.tmp-<writer>-<random>``, fsyncs it (``fsync@openssh.com``, when
the server has it), then renames it over the name (``posix-rename@openssh.com``).

Temporary files of killed writers (a whole pack each) are found by ``temporaries``:
reported by ``check``, removed by the next writer session and by ``compact``. SFTP has
no flock, so the name says who wrote it: ``<writer>`` is the machine, the boot, the pid
namespace, the pid and its start time (storage/node.py).

- Written on this boot, in this pid namespace: the writer is gone exactly when no
  process with that pid and start time runs here — proof, not a guess, and a live
  writer's file is never touched however long it takes.
- Written elsewhere (or by an older version, ``<name>.tmp<random>``): removed only when
  unchanged for ``FOREIGN_AGE`` (24 h; its mtime is checked again just before). A
  writer that is alive at all moves its file's mtime with every write and gives it up
  when a request times out (60 s); only a suspended one could come back to it.
- And if a live writer's file were removed all the same, nothing is lost: the writer
  renames by the temporary *name*, so its rename fails (ENOENT, a transient error) and
  the store is retried under a new name. A removal never touches a stored value: names
  are never reused, and removing a name that was renamed meanwhile fails.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import re
import secrets
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import paramiko
from paramiko.sftp import CMD_EXTENDED, CMD_EXTENDED_REPLY

from ..errors import ObjectMissing, RepositoryExists, StorageFull
from .base import Store
from .node import node_identity, process_gone, process_start
from .retry import storage_error

ACCEPT_NEW_ENV = "DISKVAULT_SFTP_ACCEPT_NEW_HOSTKEY"
_TMP = ".tmp"  # same marker LocalStore uses: list() never shows such names
# <name>.tmp-<machine>-<boot>-<pidns>-<pid>-<start>-<random> (see the head)
_TMP_NAME = re.compile(r"\.tmp-([0-9a-f]{16})-([0-9a-f]{16})-(\d+)-(\d+)-(\d+)-[0-9a-f]{12}$")
_UNKNOWN = "0" * 16
FOREIGN_AGE = 24 * 3600
# errors that mean the connection is gone, so a reconnect may help
_LOST = (paramiko.SSHException, EOFError, socket.timeout, ConnectionError)


_NAME_RE = re.compile(r"[^/]+(/[^/]+)*")
# OpenSSH's default MaxSessions: channels beyond it on one connection are refused
MAX_CHANNELS = 10


def check_name(name: str) -> None:
    """Refuse names that would escape the base path or alias another name (as LocalStore)."""
    if not _NAME_RE.fullmatch(name) or any(p in (".", "..") for p in name.split("/")):
        raise storage_error(f"invalid object name {name!r}", transient=False)


def _digest(*parts: str) -> str:
    """A short stand-in for an id in a file name (``_UNKNOWN`` if a part is unknown)."""
    if not all(parts):
        return _UNKNOWN
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=8).hexdigest()


class _Here:
    """This process's identity as temporary names carry it (computed once per pid)."""

    _cache: dict[int, _Here] = {}

    def __init__(self) -> None:
        node = node_identity()
        self.pid = os.getpid()
        # the host name too: cloned VMs may share a machine id (as repository/lock.py)
        self.machine = _digest(socket.gethostname(), node["machine"])
        self.boot = _digest(node["boot"])
        self.pidns = int(node["pidns"])
        self.start = process_start(self.pid) or 0  # 0: /proc could not tell
        self.tag = f"{self.machine}-{self.boot}-{self.pidns}-{self.pid}-{self.start}"

    @classmethod
    def get(cls) -> _Here:
        here = cls._cache.get(os.getpid())  # a forked child is another writer
        if here is None:
            here = cls._cache[os.getpid()] = cls()
        return here


def writer_gone(filename: str) -> bool | None:
    """Is the writer of this temporary file gone? True or False where this process can
    tell for sure (the writer ran on this boot, in this pid namespace; or on this
    machine before a reboot), None where it cannot (another machine or container, an
    older version's name)."""
    m = _TMP_NAME.search(filename)
    if m is None:
        return None
    machine, boot, pidns, pid, start = m[1], m[2], int(m[3]), int(m[4]), int(m[5])
    here = _Here.get()
    if boot != _UNKNOWN and boot == here.boot:
        if not pidns or pidns != here.pidns:
            return None  # another container on this kernel: other pids
        # 0: written where /proc could not tell the start time
        return process_gone(pid, start or None)
    if _UNKNOWN not in (machine, boot, here.boot) and machine == here.machine:
        return True  # this machine, an earlier boot: every process of it is gone
    return None


class _AcceptNew(paramiko.MissingHostKeyPolicy):
    """OpenSSH's ``accept-new``: trust a first-seen host key and remember it."""

    def __init__(self, known_hosts: str) -> None:
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: Any) -> None:
        client.get_host_keys().add(hostname, key.get_name(), key)
        try:
            os.makedirs(os.path.dirname(self.known_hosts), mode=0o700, exist_ok=True)
            with open(self.known_hosts, "a") as f:
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        except OSError:
            pass  # trusting for this session is what was asked; remembering is a bonus


class SftpStore(Store):
    def __init__(
        self,
        host: str,
        path: str,
        *,
        user: str | None = None,
        port: int | None = None,
        connections: int = 4,
        accept_new_hostkey: bool | None = None,
        timeout: float = 60.0,
        location: str | None = None,
        ssh_options: dict[str, Any] | None = None,
    ) -> None:
        if not path:
            raise ValueError("an SFTP store needs a path")
        self.host, self.user, self.port = host, user, port
        self.path = path.rstrip("/") or "/"  # relative paths are relative to the login dir
        self.location = location or f"sftp://{host}/{path.lstrip('/')}"
        self._accept_new = accept_new_hostkey
        self._ssh_options = dict(ssh_options or {})  # --rsh: wins over ~/.ssh/config
        self._timeout = timeout
        self._lock = threading.Lock()
        self.connections = max(1, min(connections, MAX_CHANNELS))
        self._slots = threading.BoundedSemaphore(self.connections)
        self._ssh: paramiko.SSHClient | None = None
        self._idle: list[paramiko.SFTPClient] = []
        self._fsync_ok = True  # until the server says it lacks fsync@openssh.com

    @property
    def upload_concurrency(self) -> int:  # type: ignore[override]
        return self.connections

    def reserve_connections(self, n: int) -> None:
        want = min(n + 1, MAX_CHANNELS)  # one channel more for reads (and the lock)
        with self._lock:
            if want > self.connections:
                self.connections = want
                # operations in flight release the old semaphore they acquired
                self._slots = threading.BoundedSemaphore(want)

    # --- connection and channel pool ---------------------------------------------------

    def _host_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {}
        for f in ("/etc/ssh/ssh_config", os.path.expanduser("~/.ssh/config")):
            try:
                cfg.update(paramiko.SSHConfig.from_path(f).lookup(self.host))
            except FileNotFoundError:
                continue
            except (OSError, paramiko.ConfigParseError) as e:
                raise storage_error(f"{self.location}: cannot read {f}: {e}", False) from None
        for key, value in self._ssh_options.items():
            if key == "identityfile":  # tried first, then the config's
                cfg[key] = [*value, *cfg.get(key, [])]
            else:
                cfg[key] = value
        return cfg

    def _connect(self) -> paramiko.SSHClient:
        cfg = self._host_config()
        hostname = cfg.get("hostname", self.host)
        port = self.port or int(cfg.get("port", 22))
        user = self.user or cfg.get("user")
        # UserKnownHostsFile replaces ~/.ssh/known_hosts, as in OpenSSH
        known_files = [os.path.expanduser(f) for f in
                       str(cfg.get("userknownhostsfile", "~/.ssh/known_hosts")).split()]
        known = known_files[0]
        ssh = paramiko.SSHClient()
        try:
            for f in known_files:
                if os.path.exists(f):
                    ssh.load_system_host_keys(f)
        except (OSError, paramiko.SSHException) as e:
            raise storage_error(f"{self.location}: cannot read known hosts: {e}", False) from None
        accept = self._accept_new
        if accept is None and "stricthostkeychecking" in self._ssh_options:
            accept = self._ssh_options["stricthostkeychecking"] in ("accept-new", "no", "off")
        if accept is None:
            accept = (os.environ.get(ACCEPT_NEW_ENV, "") not in ("", "0")
                      or cfg.get("stricthostkeychecking") in ("accept-new", "no"))
        ssh.set_missing_host_key_policy(_AcceptNew(known) if accept else paramiko.RejectPolicy())
        try:
            ssh.connect(
                hostname, port=port, username=user, key_filename=cfg.get("identityfile"),
                allow_agent=True, look_for_keys=cfg.get("identitiesonly") != "yes",
                sock=paramiko.ProxyCommand(cfg["proxycommand"]) if "proxycommand" in cfg else None,
                timeout=self._timeout, banner_timeout=self._timeout, auth_timeout=self._timeout,
            )
        except paramiko.BadHostKeyException:
            raise storage_error(
                f"{self.location}: the host key of {hostname} CHANGED (or someone is "
                "intercepting the connection); check it and fix ~/.ssh/known_hosts", False,
            ) from None
        except paramiko.AuthenticationException as e:
            raise storage_error(f"{self.location}: SSH login as {user or 'you'} refused: {e}",
                                False) from None
        except paramiko.SSHException as e:
            if "not found in known_hosts" in str(e):
                raise storage_error(
                    f"{self.location}: host key of {hostname} is unknown: connect once with "
                    f"ssh/sftp to check it, or set {ACCEPT_NEW_ENV}=1", False,
                ) from None
            raise storage_error(f"{self.location}: SSH connection failed: {e}", True) from None
        except socket.gaierror as e:
            # a name that does not resolve will not resolve in a minute either
            raise storage_error(f"{self.location}: unknown host {hostname}: {e.strerror}",
                                e.errno == socket.EAI_AGAIN) from None
        except OSError as e:
            raise storage_error(f"{self.location}: cannot connect: {e}", True) from None
        transport = ssh.get_transport()
        assert transport is not None
        transport.set_keepalive(30)  # notice a dead peer, keep NAT state alive
        return ssh

    def _open_channel(self) -> paramiko.SFTPClient:
        with self._lock:
            if self._ssh is None or not self._transport_active(self._ssh):
                self._drop_connection_locked()
                self._ssh = self._connect()
            transport = self._ssh.get_transport()
        # big windows: paramiko's 2 MiB default stalls a 32 MiB transfer on round trips
        client = paramiko.SFTPClient.from_transport(
            transport, window_size=64 << 20, max_packet_size=32 << 10
        )
        if client is None:
            raise storage_error(f"{self.location}: cannot open an SFTP channel", True)
        channel = client.get_channel()
        if channel is not None:
            channel.settimeout(self._timeout)  # a dead connection raises instead of hanging
        return client

    @staticmethod
    def _transport_active(ssh: paramiko.SSHClient) -> bool:
        t = ssh.get_transport()
        return t is not None and t.is_active()

    def _drop_connection_locked(self) -> None:
        for c in self._idle:
            with contextlib.suppress(Exception):
                c.close()
        self._idle.clear()
        if self._ssh is not None:
            with contextlib.suppress(Exception):
                self._ssh.close()
            self._ssh = None

    @contextlib.contextmanager
    def _sftp(self, op: str, name: str = "") -> Iterator[paramiko.SFTPClient]:
        """Borrow a channel for one operation; translate errors on the way out.

        A paramiko SFTP channel matches replies to requests for one caller at a time,
        so each thread gets a channel of its own (``connections`` at most).
        """
        with self._slots:
            client = self._checkout()
            try:
                if client is None:
                    client = self._open_channel()
                yield client
            except _LOST as e:
                if client is not None:
                    with contextlib.suppress(Exception):
                        client.close()
                raise storage_error(
                    f"{self.location}: {op} {name}: connection lost: {e or type(e).__name__}",
                    True) from None
            except OSError as e:
                self._put_back(client)
                raise self._os_error(e, op, name) from None
            except BaseException:
                self._put_back(client)
                raise
            else:
                self._put_back(client)

    def _checkout(self) -> paramiko.SFTPClient | None:
        with self._lock:
            if self._ssh is None or not self._transport_active(self._ssh):
                self._drop_connection_locked()  # every idle channel died with it
                return None
            while self._idle:
                client = self._idle.pop()
                channel = client.get_channel()
                if channel is not None and not channel.closed:
                    return client
        return None

    def _put_back(self, client: paramiko.SFTPClient | None) -> None:
        if client is None:
            return
        channel = client.get_channel()
        with self._lock:
            if channel is not None and not channel.closed and self._ssh is not None:
                self._idle.append(client)
                return
        with contextlib.suppress(Exception):
            client.close()

    def _os_error(self, e: OSError, op: str, name: str) -> Exception:
        if e.errno == errno.ENOENT and name:
            return ObjectMissing(name)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return StorageFull(self.location)
        text = e.strerror or (str(e.args[0]) if e.args else type(e).__name__)
        # SFTP v3 has no "disk full" code: a generic failure is retried, never fatal
        return storage_error(f"{self.location}: {op} {name}: {text}", e.errno is None)

    def _p(self, name: str) -> str:
        check_name(name)
        return posixpath.join(self.path, name)

    # --- Store interface -----------------------------------------------------------------

    def exists(self) -> bool:
        with self._sftp("stat") as c:
            try:
                return stat.S_ISDIR(c.stat(self.path).st_mode or 0)
            except FileNotFoundError:
                return False

    def create(self) -> None:
        with self._sftp("create") as c:
            self._makedirs(c, self.path)
            if c.listdir(self.path):
                raise RepositoryExists(self.location)

    def _makedirs(self, c: paramiko.SFTPClient, path: str) -> None:
        try:
            c.mkdir(path)
        except FileNotFoundError:
            parent = posixpath.dirname(path)
            if parent in ("", "/", path):
                raise
            self._makedirs(c, parent)
            self._makedirs(c, path)
        except OSError:
            # SFTP v3 reports "exists" as a generic failure; only a directory will do
            if not stat.S_ISDIR(c.stat(path).st_mode or 0):
                raise

    def load(self, name: str, offset: int = 0, size: int | None = None) -> bytes:
        path = self._p(name)
        with self._sftp("load", name) as c, c.open(path, "rb") as f:
            if size is not None and size <= 64 << 10:
                # small range: one read request; past the end it returns what is there
                f.seek(offset)
                return f.read(size) if size > 0 else b""
            end = f.stat().st_size or 0
            if size is not None:
                end = min(end, offset + size)
            want = end - offset
            if want <= 0:
                return b""
            f.seek(offset)
            f.prefetch(end)  # pipeline the 32 KiB reads instead of one round trip each
            data = bytearray()
            while len(data) < want:
                # one prefetched block per read: paramiko's read(n) joins blocks by
                # bytes concatenation, quadratic for a big n (40 MiB took 24 s)
                piece = f.read(min(want - len(data), f.MAX_REQUEST_SIZE))
                if not piece:
                    break
                data += piece
        if len(data) != want:
            raise storage_error(f"{self.location}: load {name}: short read "
                                f"({len(data)} of {want} bytes)", True)
        return bytes(data)

    def store(self, name: str, value: bytes | bytearray | memoryview) -> None:
        path = self._p(name)
        tmp = f"{path}{_TMP}-{_Here.get().tag}-{secrets.token_hex(6)}"
        with self._sftp("store", name) as c:
            try:
                try:
                    self._write(c, tmp, value)
                except FileNotFoundError:  # first value in this directory
                    self._makedirs(c, posixpath.dirname(tmp))
                    self._write(c, tmp, value)
                c.posix_rename(tmp, path)
            except _LOST:
                raise  # nothing more can be asked of this connection
            except OSError as e:
                with contextlib.suppress(Exception):
                    c.remove(tmp)
                if e.errno is None and self._no_space(c, len(memoryview(value))):
                    raise StorageFull(self.location) from None
                if e.errno == errno.ENOENT:  # not ObjectMissing: the directory vanished
                    raise storage_error(f"{self.location}: store {name}: {e}", True) from None
                raise

    def _write(self, c: paramiko.SFTPClient, path: str, value: bytes | bytearray | memoryview
               ) -> None:
        with c.open(path, "wb", bufsize=0) as f:  # unbuffered: no copy of the value
            f.set_pipelined(True)  # do not wait for each 32 KiB write's reply
            f.write(value)
            self._fsync(c, f)
            # the fsync reply came after every write reply, and paramiko parked any write
            # failure on the file; close() would not look at it any more (a lost ENOSPC)
            f._check_exception()
            if (f.stat().st_size or 0) != len(memoryview(value)):
                raise OSError(f"wrote {f.stat().st_size} of {len(memoryview(value))} bytes")

    def _fsync(self, c: paramiko.SFTPClient, f: paramiko.SFTPFile) -> None:
        if not self._fsync_ok:
            return
        try:
            # paramiko has no wrapper for this OpenSSH extension; the request is simple
            c._request(CMD_EXTENDED, "fsync@openssh.com", f.handle)
        except OSError as e:
            if e.errno is not None or "unsupported" not in str(e).lower():
                raise
            self._fsync_ok = False  # the server cannot: durability is the server's then

    def _no_space(self, c: paramiko.SFTPClient, needed: int) -> bool:
        """After a generic write failure: is the server's filesystem full?"""
        try:
            t, msg = c._request(CMD_EXTENDED, "statvfs@openssh.com", self.path)
        except Exception:
            return False
        if t != CMD_EXTENDED_REPLY:
            return False
        _bsize, frsize, _blocks, _bfree, bavail = struct.unpack(">5Q", msg.get_bytes(40))
        return bool(bavail * frsize < needed)

    def delete(self, name: str) -> None:
        with self._sftp("delete", name) as c:
            c.remove(self._p(name))

    def size(self, name: str) -> int:
        with self._sftp("stat", name) as c:
            return int(c.stat(self._p(name)).st_size or 0)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        for name, attr in self._walk(prefix):
            if _TMP not in posixpath.basename(name):
                yield name, int(attr.st_size or 0)

    def _walk(self, prefix: str) -> Iterator[tuple[str, paramiko.SFTPAttributes]]:
        """Every file under ``prefix`` (temporary ones too) with its attributes. The
        directories of one level are listed at once, on up to ``connections`` channels:
        a repository has 256 pack directories, and one round trip each adds up."""
        if prefix:
            check_name(prefix.rstrip("/"))
        level = [prefix.rstrip("/")]
        with ThreadPoolExecutor(self.connections, thread_name_prefix="sftp-list") as pool:
            while level:
                subdirs = []
                for rel, entries in zip(level, pool.map(self._listdir, level), strict=True):
                    for e in entries:
                        name = f"{rel}/{e.filename}" if rel else e.filename
                        if stat.S_ISDIR(e.st_mode or 0):
                            subdirs.append(name)
                        else:
                            yield name, e
                level = subdirs

    def _listdir(self, rel: str) -> Sequence[paramiko.SFTPAttributes]:
        try:
            # hold a channel per directory, not across the caller's loop body
            with self._sftp("list", rel or "/") as c:
                return c.listdir_attr(posixpath.join(self.path, rel))
        except ObjectMissing:
            return []  # no such directory (yet): nothing stored under it

    def temporaries(self, remove: bool = False) -> Sequence[tuple[str, int]]:
        """Temporary files of writers that are gone (the head says how that is told):
        ``(name, size)``; ``remove`` deletes them."""
        found = []
        for name, attr in self._walk(""):
            base = posixpath.basename(name)
            if _TMP not in base:
                continue
            gone = writer_gone(base)
            if gone is False or (gone is None and not _aged(attr)):
                continue
            if remove and not self._remove_temporary(name, recheck_age=gone is None):
                continue
            found.append((name, int(attr.st_size or 0)))
        return found

    def _remove_temporary(self, name: str, recheck_age: bool) -> bool:
        path = posixpath.join(self.path, name)
        try:
            with self._sftp("delete", name) as c:
                if recheck_age and not _aged(c.stat(path)):
                    return False  # written to since it was listed: someone is at it
                c.remove(path)
        except ObjectMissing:
            return False  # renamed into place or removed meanwhile
        return True

    def close(self) -> None:
        with self._lock:
            self._drop_connection_locked()


def _aged(attr: paramiko.SFTPAttributes) -> bool:
    """Unchanged for FOREIGN_AGE, by the server's clock as seen from here (a skew of
    hours between the two still leaves a day)."""
    return time.time() - (attr.st_mtime or 0) > FOREIGN_AGE
