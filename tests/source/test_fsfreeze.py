"""--fsfreeze on a real ext4 filesystem (loop device): frozen while read, and thawed
after success, error, the time limit, SIGTERM and SIGKILL of diskvault — proven by a
writer that sleeps uninterruptibly while frozen and must finish afterwards. Refusals:
the repository's filesystem, /, a non-mount point."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from source.hostfs import (
    DEADLINE,
    fifo_has_reader,
    mounted,
    start_one_write,
    state,
    wait_for,
)
from support import DV, dv, init_repo, needs_loop, needs_tool, sha256_file

pytestmark = [needs_loop, needs_tool("mkfs.ext4", "fsfreeze")]


@pytest.fixture
def fs(tmp_path):
    """An ext4 filesystem holding an image; the repository and a FIFO outside it."""
    with mounted(tmp_path, "ext4", mib=64) as mnt:
        img = os.path.join(mnt, "vm.img")
        with open(img, "wb") as f:
            f.write(os.urandom(2 << 20))
            f.truncate(6 << 20)
        repo = str(tmp_path / "repo")
        env = init_repo(repo)
        fifo = str(tmp_path / "pipe")
        os.mkfifo(fifo)
        yield mnt, img, repo, env, fifo


def assert_thawed(mnt: str) -> None:
    """A write and fsync on the filesystem finishes (bounded by a generous deadline)."""
    w = start_one_write(os.path.join(mnt, "after"))
    assert w.wait(timeout=DEADLINE) == 0


def _start_held(mnt: str, img: str, repo: str, env: dict, fifo: str, *extra: str):
    """diskvault with MNT frozen, held mid-backup on the FIFO (read after the image)."""
    p = subprocess.Popen([*DV, "create", "--fsfreeze", mnt, "--read-special", *extra,
                          f"{repo}::held", img, fifo], env={**os.environ, **env},
                         stderr=subprocess.PIPE)
    w = wait_for(lambda: fifo_has_reader(fifo) or p.poll() is not None,
                 "diskvault reading the FIFO")
    assert p.poll() is None, p.stderr.read().decode() if p.stderr else ""
    return p, w


def _assert_frozen(mnt: str) -> subprocess.Popen:
    """Start a writer and see it sleep uninterruptibly (D): the filesystem is frozen."""
    writer = start_one_write(os.path.join(mnt, "blocked"))
    wait_for(lambda: state(writer.pid) == "D", "a writer blocked by the freeze")
    return writer


def test_frozen_while_read_thawed_after_success(fs, tmp_path):
    mnt, img, repo, env, _ = fs
    r = dv("create", "--fsfreeze", mnt, f"{repo}::a", img, env=env)
    assert r.returncode == 0, r.stderr
    assert_thawed(mnt)
    out = tmp_path / "restored"
    with open(out, "wb") as f:
        f.write(dv("extract", "--stdout", f"{repo}::a", env=env).stdout)
    assert sha256_file(str(out)) == sha256_file(img)


def test_thawed_after_an_error_during_the_read(fs):
    mnt, img, repo, env, fifo = fs
    r = dv("create", "--fsfreeze", mnt, "--read-special", "--read-special-timeout", "0.2",
           f"{repo}::a", img, fifo, env=env, check=False)
    assert r.returncode == 2
    assert "no writer connected to the FIFO" in r.stderr.decode()  # the fault fired
    assert_thawed(mnt)
    assert dv("list", repo, env=env).stdout == b""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_thawed_after_diskvault_is_killed(fs, sig):
    mnt, img, repo, env, fifo = fs
    p, w = _start_held(mnt, img, repo, env, fifo)
    try:
        writer = _assert_frozen(mnt)
        p.send_signal(sig)
        _, err = p.communicate(timeout=DEADLINE)
        # thawed by diskvault's finally (SIGTERM) or by its watchdog (SIGKILL)
        assert writer.wait(timeout=DEADLINE) == 0
    finally:
        os.close(w)  # type: ignore[arg-type]
        if p.poll() is None:
            p.kill()
            p.wait()
    if sig == signal.SIGTERM:
        assert p.returncode == 2
        assert "terminated by SIGTERM" in err.decode()
    else:
        assert p.returncode == -signal.SIGKILL
    assert_thawed(mnt)
    assert dv("list", repo, env=env).stdout == b""


def test_time_limit_thaws_and_fails_the_backup(fs):
    mnt, img, repo, env, fifo = fs
    p, w = _start_held(mnt, img, repo, env, fifo, "--fsfreeze-timeout", "1")
    try:
        writer = start_one_write(os.path.join(mnt, "blocked"))
        # the watchdog thaws at the time limit while diskvault still reads: the writer ends
        assert writer.wait(timeout=DEADLINE) == 0
    finally:
        os.close(w)  # type: ignore[arg-type]  # EOF: diskvault finishes reading, then
    _, err = p.communicate(timeout=DEADLINE)  # must refuse to commit
    assert p.returncode == 2
    assert "longer than --fsfreeze-timeout 1 s" in err.decode()
    assert dv("list", repo, env=env).stdout == b""


def test_refuses_to_freeze_the_repository_filesystem(fs):
    mnt, img, _, env, _ = fs
    repo = os.path.join(mnt, "repo")
    init_repo(repo)
    r = dv("create", "--fsfreeze", mnt, f"{repo}::a", img, env=env, check=False)
    assert r.returncode == 2
    assert r.stderr.decode().strip().splitlines() == [
        f"diskvault: error: refusing to freeze {mnt}: it holds the repository ({repo}), "
        "which diskvault needs while the freeze lasts"]
    assert_thawed(mnt)
    assert dv("list", repo, env=env).stdout == b""


def test_refuses_root_and_non_mount_points(fs):
    mnt, img, repo, env, _ = fs
    for target, msg in (("/", "refusing to freeze /"),
                        (os.path.dirname(img) + "/nothing", "not a mount point")):
        r = dv("create", "--fsfreeze", target, f"{repo}::a", img, env=env, check=False)
        assert r.returncode == 2
        assert msg in r.stderr.decode()
        assert len(r.stderr.decode().strip().splitlines()) == 1


@needs_tool("e2fsck", "debugfs", "findmnt")
def test_disk_backup_of_the_frozen_device_is_clean_and_skips_free_blocks(fs, tmp_path):
    mnt, _, repo, env, _ = fs
    content = os.urandom(300 << 10)
    with open(os.path.join(mnt, "fresh"), "wb") as f:
        f.write(content)  # not synced: the freeze writes it out and settles the journal
    dev = subprocess.run(["findmnt", "-n", "-o", "SOURCE", mnt], capture_output=True,
                         text=True, check=True).stdout.strip()
    r = dv("disk", "backup", "--json", "--fsfreeze", mnt, f"{repo}::d", dev, env=env)
    assert r.stderr == b""  # frozen: not "in use read-write", so no warning, exit 0
    assert b'"fs": "ext4"' in r.stdout
    out = tmp_path / "restored.img"
    with open(out, "wb") as f:
        f.write(dv("extract", "--stdout", f"{repo}::d", env=env).stdout)
    fsck = subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr  # clean: no journal to replay
    got = subprocess.run(["debugfs", "-R", "cat /fresh", str(out)], capture_output=True,
                         check=True).stdout
    assert got == content
    assert_thawed(mnt)
