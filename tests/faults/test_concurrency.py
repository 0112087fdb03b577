"""Processes at once on one repository: two backups, prune or compact during a backup,
and the lock of a killed process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from support import DV, dv, init_repo


def _popen(*args: str, env: dict, stdin=None) -> subprocess.Popen:
    return subprocess.Popen([*DV, *args], env={**os.environ, **env},
                            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_locks(repo: str, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.isdir(f"{repo}/locks") and len(os.listdir(f"{repo}/locks")) >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"no {n} lock(s) appeared in {repo}/locks")


def _extract(repo: str, name: str, env: dict) -> bytes:
    return dv("extract", "--stdout", f"{repo}::{name}", env=env).stdout


@pytest.fixture
def repo(tmp_path):
    path = str(tmp_path / "repo")
    return path, init_repo(path, "repokey", "--pack-size", "256KiB")


def _stalled_create(path: str, env: dict, name: str, head: bytes) -> subprocess.Popen:
    """A backup from stdin that holds its lock until we close its input."""
    p = _popen("create", "--stdin-name", name, f"{path}::{name}", "-", env=env,
               stdin=subprocess.PIPE)
    assert p.stdin is not None
    p.stdin.write(head)
    p.stdin.flush()
    _wait_for_locks(path, 1)
    return p


def test_two_backups_at_once_share_dedup(repo, tmp_path):
    path, env = repo
    common = os.urandom(6 << 20)
    data = {n: common + os.urandom(2 << 20) for n in ("one", "two")}
    for n, d in data.items():
        (tmp_path / n).write_bytes(d)
    procs = {n: _popen("create", "--json", f"{path}::{n}", str(tmp_path / n), env=env)
             for n in data}
    results = {n: p.communicate(timeout=120) for n, p in procs.items()}
    for n, p in procs.items():
        assert p.returncode == 0, results[n][1].decode()
        assert _extract(path, n, env) == data[n]
    # both stored into one repository; a third backup of the shared data stores nothing new
    (tmp_path / "three").write_bytes(common)
    r = dv("create", "--json", "--chunker-params", "fixed,4194304", f"{path}::three",
           str(tmp_path / "three"), env=env)
    stats = json.loads(r.stdout)["archive"]["stats"]
    assert stats["new_chunks"] <= 1 and stats["dedup"] >= len(common) - (4 << 20), stats
    assert _extract(path, "three", env) == common
    assert dv("check", "--verify-data", path, env=env).returncode == 0


def test_prune_waits_for_a_running_backup(repo, tmp_path):
    path, env = repo
    old = os.urandom(1 << 20)
    (tmp_path / "old").write_bytes(old)
    dv("create", f"{path}::old", str(tmp_path / "old"), env=env)
    head, tail = os.urandom(3 << 20), os.urandom(1 << 20)
    backup = _stalled_create(path, env, "new", head)
    prune = _popen("prune", "--lock-wait", "60", "--keep-last", "1", "--list", path, env=env)
    time.sleep(1.5)
    assert prune.poll() is None, "prune ran while a backup held its lock"
    backup.stdin.write(tail)  # type: ignore[union-attr]
    backup.stdin.close()  # type: ignore[union-attr]
    assert backup.wait(60) == 0, backup.stderr.read().decode()  # type: ignore[union-attr]
    out, err = prune.communicate(timeout=60)
    assert prune.returncode == 0, err.decode()
    assert "Keeping archive (rule: secondly #1):" in out.decode() and "new" in out.decode()
    names = dv("list", "--short", path, env=env).stdout.decode().split()
    assert names == ["new"]
    assert _extract(path, "new", env) == head + tail
    dv("compact", path, env=env)
    assert _extract(path, "new", env) == head + tail
    assert dv("check", "--verify-data", path, env=env).returncode == 0


def test_compact_cannot_run_during_a_backup(repo, tmp_path):
    path, env = repo
    (tmp_path / "a").write_bytes(os.urandom(2 << 20))
    dv("create", f"{path}::a", str(tmp_path / "a"), env=env)
    dv("delete", f"{path}::a", env=env)  # garbage for compact
    data = os.urandom(2 << 20)
    backup = _stalled_create(path, env, "b", data[: 1 << 20])
    r = dv("compact", "--lock-wait", "0.5", path, env=env, check=False)
    assert r.returncode == 2 and b"repository is locked (shared lock" in r.stderr, r.stderr
    backup.stdin.write(data[1 << 20 :])  # type: ignore[union-attr]
    backup.stdin.close()  # type: ignore[union-attr]
    assert backup.wait(60) == 0
    assert b"freed" in dv("compact", path, env=env).stdout
    assert _extract(path, "b", env) == data


def test_lock_of_a_killed_process(repo, tmp_path):
    path, env = repo
    backup = _stalled_create(path, env, "x", os.urandom(1 << 20))
    backup.send_signal(signal.SIGKILL)
    backup.wait()
    assert len(os.listdir(f"{path}/locks")) == 1  # left behind by the dead process
    # same host, pid gone: detected as stale and removed by the next command
    dv("delete", "--lock-wait", "0", f"{path}::nonexistent", env=env, check=False)
    assert dv("list", "--lock-wait", "0", path, env=env).returncode == 0
    assert os.listdir(f"{path}/locks") == []
    # a lock of another host cannot be judged by pid: reported stale, removed by break-lock
    with open(f"{path}/locks/00000000000000000001-feedfacecafe", "w") as f:
        json.dump({"kind": "exclusive", "host": "other-host", "pid": 4242,
                   "time": time.time() - 3600, "id": "00000000000000000001-feedfacecafe"}, f)
    r = dv("list", "--lock-wait", "0", path, env=env, check=False)
    assert r.returncode == 2 and b"stale" in r.stderr and b"break-lock" in r.stderr
    out = dv("break-lock", path, env=env).stdout.decode()
    assert "other-host" in out
    dv("list", path, env=env)
    assert dv("check", path, env=env).returncode == 0
