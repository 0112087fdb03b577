"""Temporary files of killed writers in a local repository: found, reported by
``check``, removed by the next writer session and by ``compact`` — never a live
writer's (storage/local.py argues why the lock makes that safe).

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

from support import dv, init_repo

from diskvault.storage import local
from diskvault.storage.local import LocalStore

WRITER = textwrap.dedent("""
    import os, sys
    from diskvault.storage.local import LocalStore
    def stop(fd):  # the data is written; announce it and wait to be killed
        sys.stdout.write("ready\\n")
        sys.stdout.flush()
        sys.stdin.read()
    os.fsync = stop
    LocalStore(sys.argv[1]).store(sys.argv[2], os.urandom(4 << 20))
""")


def _tmp_files(repo: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(repo) for f in fs if ".tmp" in f)


class Writer:
    """A writer process stopped in the middle of storing ``name``."""

    def __init__(self, repo: str, name: str) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", WRITER, repo, name],
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


def test_killed_writer_temporaries_are_reported_and_removed(tmp_path):
    repo = str(tmp_path / "repo")
    env = init_repo(repo, "none")
    data = tmp_path / "data"
    data.write_bytes(os.urandom(100000))
    store = LocalStore(repo)
    w = Writer(repo, "packs/ab/ab" + "0" * 62)
    try:
        (tmp,) = _tmp_files(repo)
        # alive: never listed, never removed — by a cleaner, a backup or compact
        assert store.temporaries(remove=True) == []
        dv("create", f"{repo}::live", str(data), env=env)
        assert _tmp_files(repo) == [tmp]
        w.kill()
    finally:
        w.close()
    assert store.temporaries() == [(os.path.relpath(tmp, repo), 4 << 20)]
    r = dv("check", repo, env=env)
    assert b"1 temporary file(s) (4194304 bytes) left by interrupted writes" in r.stdout + \
        r.stderr
    dv("create", f"{repo}::next", str(data), env=env)  # a new writer session cleans up
    assert _tmp_files(repo) == []
    w = Writer(repo, "index/" + "1" * 32)
    try:
        w.kill()
    finally:
        w.close()
    assert len(_tmp_files(repo)) == 1
    dv("compact", repo, env=env)
    assert _tmp_files(repo) == []
    dv("check", repo, env=env)


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
