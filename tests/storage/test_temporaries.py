"""Temporary files of killed writers in a local and in an SFTP repository (the real
sshd on 127.0.0.1): found, reported by ``check``, removed by the next writer session and
by ``compact`` — never a live writer's. storage/local.py argues why its flock makes that
safe; storage/sftp.py why names carrying the writer's identity do, over SFTP.

The writer is a real process stopped at a known point of its write (its fsync, after
the data and before the rename: what a kill mid-pack leaves) and killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support import dv, init_repo

from diskvault.storage import local, sftp
from diskvault.storage.local import LocalStore
from diskvault.storage.url import open_store

WRITER = textwrap.dedent("""
    import os, sys
    from diskvault.storage import sftp
    from diskvault.storage.url import open_store
    def stop(*_):  # the data is written; announce it and wait to be killed
        sys.stdout.write("ready\\n")
        sys.stdout.flush()
        sys.stdin.read()
    def sftp_stop(self, c, f):
        f.stat()  # answered after every pipelined write: the whole value is in the file
        stop()
    os.fsync = stop
    sftp.SftpStore._fsync = sftp_stop
    open_store(sys.argv[1], retry=False).store(sys.argv[2], os.urandom(4 << 20))
""")


def _tmp_files(repo: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(repo) for f in fs if ".tmp" in f)


class Writer:
    """A writer process stopped in the middle of storing ``name``."""

    def __init__(self, location: str, name: str) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", WRITER, location, name],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.p.stdout is not None
        assert self.p.stdout.readline() == b"ready\n"

    def kill(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        assert self.p.wait(timeout=60) == -signal.SIGKILL  # the kill really happened

    def close(self) -> None:
        if self.p.poll() is None:
            self.kill()
        for f in (self.p.stdin, self.p.stdout):
            if f:
                f.close()


@pytest.fixture(params=["local", "sftp"])
def repo_at(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(location, the directory holding the repository's files) of a new repository."""
    root = str(tmp_path / "repo")
    if request.param == "local":
        return root, root
    server = request.getfixturevalue("sftp_server")
    server.configure_client(Path(os.environ["HOME"]))
    return server.url(root), root


def test_killed_writer_temporaries_are_reported_and_removed(tmp_path, repo_at):
    location, repo = repo_at
    env = init_repo(location, "none")
    data = tmp_path / "data"
    data.write_bytes(os.urandom(100000))
    store = open_store(location, retry=False)
    w = Writer(location, "packs/ab/ab" + "0" * 62)
    try:
        (tmp,) = _tmp_files(repo)
        # alive: never listed, never removed — by a cleaner, a backup or compact
        assert store.temporaries(remove=True) == []
        dv("create", f"{location}::live", str(data), env=env)
        assert _tmp_files(repo) == [tmp]
        w.kill()
    finally:
        w.close()
    assert store.temporaries() == [(os.path.relpath(tmp, repo), 4 << 20)]
    r = dv("check", location, env=env)
    assert b"1 temporary file(s) (4194304 bytes) left by interrupted writes" in r.stdout + \
        r.stderr
    dv("create", f"{location}::next", str(data), env=env)  # a new writer session cleans up
    assert _tmp_files(repo) == []
    w = Writer(location, "index/" + "1" * 32)
    try:
        w.kill()
    finally:
        w.close()
    assert len(_tmp_files(repo)) == 1
    dv("compact", location, env=env)
    assert _tmp_files(repo) == []
    dv("check", location, env=env)
    store.close()


def test_writer_whose_fresh_file_a_cleaner_took_starts_again(tmp_path, monkeypatch):
    """The one gap of the lock rule: created, not yet locked. The cleaner takes the file;
    the writer notices (st_nlink 0) and writes under a new name."""
    root = tmp_path / "store"
    store = LocalStore(str(root))
    store.create()
    real_flock = local.fcntl.flock
    taken: list = []

    def flock_after_a_cleaner(fd: int, op: int) -> None:
        if op == local.fcntl.LOCK_EX and not taken:  # the writer's blocking lock
            taken.append(store.temporaries(remove=True))
        real_flock(fd, op)

    monkeypatch.setattr(local.fcntl, "flock", flock_after_a_cleaner)
    store.store("packs/cd/value", b"payload")
    assert len(taken) == 1 and len(taken[0]) == 1  # the cleaner did take the first file
    assert store.load("packs/cd/value") == b"payload"
    assert _tmp_files(str(root)) == []


def test_legacy_temporaries_only_when_old(tmp_path):
    root = tmp_path / "store"
    store = LocalStore(str(root))
    store.create()
    os.makedirs(root / "packs" / "ef")
    fresh = root / "packs" / "ef" / "ef01.tmp1234.7f00aa"
    old = root / "packs" / "ef" / "ef02.tmp1235.7f00bb"
    for f in (fresh, old):
        f.write_bytes(b"x" * 100)
    past = time.time() - local.LEGACY_AGE - 60
    os.utime(old, (past, past))
    assert store.temporaries(remove=True) == [("packs/ef/ef02.tmp1235.7f00bb", 100)]
    assert fresh.exists() and not old.exists()


def _sftp_tmp(machine: str, boot: str, pidns: int, pid: int, start: int) -> str:
    return f"packs/aa/aa01.tmp-{machine}-{boot}-{pidns}-{pid}-{start}-{'5' * 12}"


def test_sftp_judges_writers_of_this_boot_and_waits_out_others(sftp_server, tmp_path):
    """Planted temporaries of writers the cleaner can and cannot judge: what is provably
    gone goes at once; another machine's or container's file only once a day old."""
    root = tmp_path / "repo"
    sftp_server.configure_client(Path(os.environ["HOME"]))
    store = open_store(sftp_server.url(str(root)), retry=False)
    store.create()
    here = sftp._Here.get()
    me = os.getpid()
    other_boot, other_machine = "b" * 16, "c" * 16
    live = _sftp_tmp(here.machine, here.boot, here.pidns, me, here.start)
    pid_reused = _sftp_tmp(here.machine, here.boot, here.pidns, me, 1)
    other_container = _sftp_tmp(here.machine, here.boot, here.pidns + 1, 99999999, 1)
    rebooted = _sftp_tmp(here.machine, other_boot, here.pidns, me, 1)
    foreign_new = _sftp_tmp(other_machine, other_boot, here.pidns, 1, 1)
    foreign_old = _sftp_tmp(other_machine, other_boot, here.pidns, 2, 1)
    legacy_old = "index/0123.tmp0123456789ab"
    for name in (live, pid_reused, other_container, rebooted, foreign_new, foreign_old,
                 legacy_old):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x" * 10)
    past = time.time() - sftp.FOREIGN_AGE - 60
    for name in (live, foreign_old, legacy_old):
        os.utime(root / name, (past, past))
    assert sftp.writer_gone(os.path.basename(live)) is False
    gone = {pid_reused, foreign_old, legacy_old}
    if here.machine != sftp._UNKNOWN and here.boot != sftp._UNKNOWN:
        gone.add(rebooted)  # this machine before a reboot (needs a machine id to tell)
    assert sorted(n for n, _ in store.temporaries(remove=True)) == sorted(gone)
    left = {str(p.relative_to(root)) for p in root.rglob("*.tmp*")}
    assert left == {live, pid_reused, other_container, rebooted, foreign_new,
                    foreign_old, legacy_old} - gone
    assert dict(store.list("")) == {}  # temporaries are never values
    store.close()


def test_sftp_file_written_to_after_listing_is_kept(sftp_server, tmp_path, monkeypatch):
    """A foreign temporary old when listed but written to before its removal (someone is
    at it after all): the age is checked again just before the remove, and it stays."""
    root = tmp_path / "repo"
    sftp_server.configure_client(Path(os.environ["HOME"]))
    store = open_store(sftp_server.url(str(root)), retry=False)
    store.create()
    name = _sftp_tmp("c" * 16, "b" * 16, 1, 2, 1)  # another machine's writer
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(b"x" * 10)
    past = time.time() - sftp.FOREIGN_AGE - 60
    os.utime(root / name, (past, past))
    real_remove = store._remove_temporary
    touched: list[str] = []

    def written_meanwhile(n: str, recheck_age: bool) -> bool:
        os.utime(root / n)  # its writer wrote to it between the listing and now
        touched.append(n)
        return real_remove(n, recheck_age)

    monkeypatch.setattr(store, "_remove_temporary", written_meanwhile)
    assert store.temporaries(remove=True) == []
    assert touched == [name] and (root / name).exists()
    store.close()


def test_sftp_writer_whose_file_a_cleaner_took_stores_again(sftp_server, tmp_path,
                                                            monkeypatch):
    """Were a live writer's temporary removed all the same, nothing is lost: its rename
    by the old name fails (ENOENT: transient) and the retry stores under a new name."""
    root = tmp_path / "repo"
    sftp_server.configure_client(Path(os.environ["HOME"]))
    store = open_store(sftp_server.url(str(root)))  # with retries, as commands use it
    store.create()
    real_write = sftp.SftpStore._write
    taken: list[str] = []

    def write_then_lose(self, c, path: str, value) -> None:
        real_write(self, c, path, value)
        if not taken:  # the first attempt's file vanishes before its rename
            taken.append(path)
            c.remove(path)

    monkeypatch.setattr(sftp.SftpStore, "_write", write_then_lose)
    store.store("packs/cd/value", b"payload")
    assert len(taken) == 1  # the fault fired
    assert store.load("packs/cd/value") == b"payload"
    assert not [p for p in root.rglob("*") if ".tmp" in p.name]
    store.close()
