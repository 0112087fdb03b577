"""--snapshot btrfs on a real btrfs filesystem (loop device): a point-in-time copy of an
image being written, snapshots removed after success, failure, SIGTERM, and (by the next
run) after SIGKILL — never one of a live run."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from source.hostfs import (
    DEADLINE,
    check_prefix,
    fifo_has_reader,
    mounted,
    snapshots_in,
    start_appender,
    stop,
    wait_for,
)
from support import DV, dv, init_repo, needs_loop, needs_tool, sha256_file

from diskvault.errors import SnapshotError
from diskvault.source import btrfs_snap

pytestmark = [needs_loop, needs_tool("mkfs.btrfs", "btrfs")]


@pytest.fixture
def vms(tmp_path):
    """A subvolume ``vms`` on a fresh btrfs filesystem; a repository outside it."""
    with mounted(tmp_path, "btrfs") as mnt:
        d = os.path.join(mnt, "vms")
        subprocess.run(["btrfs", "subvolume", "create", d], check=True, capture_output=True)
        env = init_repo(str(tmp_path / "repo"))
        yield d, str(tmp_path / "repo"), env


def _arch(path: str) -> str:
    return path.lstrip("/")


def test_snapshot_of_image_being_written_is_a_point_in_time(vms):
    d, repo, env = vms
    log = os.path.join(d, "records.log")
    writer = start_appender(log)
    try:
        wait_for(lambda: os.path.exists(log) and os.path.getsize(log) >= 300 * 64,
                 "the writer's first 300 records")
        r = dv("create", "--snapshot", "btrfs", f"{repo}::a", log, env=env)
        wait_for(lambda: os.path.getsize(log) >= 64 * 50 + _backed_up_size(repo, log, env),
                 "the writer going on after the backup")
    finally:
        stop(writer)
    assert r.returncode == 0, r.stderr
    data = dv("extract", "--stdout", f"{repo}::a", _arch(log), env=env).stdout
    n = check_prefix(data)
    assert n >= 300
    # the whole file was written on: the live file holds more than the point in time
    assert os.path.getsize(log) > len(data)
    listed = dv("list", "--format", "{path}{NL}", f"{repo}::a", env=env).stdout.decode()
    assert listed.split() == [_arch(log)]  # archive paths are the original paths
    assert snapshots_in(d) == []


def _backed_up_size(repo: str, path: str, env: dict) -> int:
    out = dv("list", "--format", "{size}{NL}", f"{repo}::a", env=env).stdout.decode()
    return int(out.split()[0])


def test_snapshot_of_directory_and_disk_backup_restore_identically(vms, tmp_path):
    d, repo, env = vms
    img = os.path.join(d, "vm.raw")
    with open(img, "wb") as f:
        f.write(os.urandom(3 << 20))
        f.truncate(8 << 20)
    subprocess.run(["sfdisk", "-q", img], input="label: gpt\nsize=4M, type=L\n", text=True,
                   check=True, capture_output=True)
    os.symlink("vm.raw", os.path.join(d, "current"))
    dv("create", "--snapshot", "btrfs", f"{repo}::dir", d, env=env)
    out = tmp_path / "out"
    out.mkdir()
    dv("extract", f"{repo}::dir", cwd=str(out), env=env)
    got = out / _arch(d)
    assert sha256_file(str(got / "vm.raw")) == sha256_file(img)
    assert os.readlink(got / "current") == "vm.raw"
    dv("disk", "backup", "--snapshot", "btrfs", f"{repo}::disk", img, env=env)
    whole = dv("extract", "--stdout", f"{repo}::disk", env=env).stdout
    with open(img, "rb") as f:
        assert whole == f.read()
    assert snapshots_in(d) == []


def test_path_not_on_btrfs_is_one_clear_error(vms, tmp_path):
    _, repo, env = vms
    f = tmp_path / "plain.img"
    f.write_bytes(b"x" * 4096)
    r = dv("create", "--snapshot", "btrfs", f"{repo}::a", str(f), env=env, check=False)
    assert r.returncode == 2
    assert r.stderr.decode().strip().splitlines() == [
        f"diskvault: error: {f} is not on a btrfs filesystem: --snapshot btrfs cannot "
        "snapshot it"]


def test_snapshot_removed_after_a_failed_backup(vms):
    d, repo, env = vms
    with open(os.path.join(d, "vm.img"), "wb") as f:
        f.write(os.urandom(1 << 20))
    os.mkfifo(os.path.join(d, "pipe"))  # no writer: reading it fails after the snapshot
    r = dv("create", "--snapshot", "btrfs", "--read-special", "--read-special-timeout", "0.2",
           f"{repo}::a", d, env=env, check=False)
    assert r.returncode == 2
    assert "no writer connected to the FIFO" in r.stderr.decode()  # the fault fired
    assert snapshots_in(d) == []
    assert dv("list", repo, env=env).stdout == b""


def _start_held(repo: str, d: str, env: dict, name: str, *extra: str):
    """diskvault backing up ``d``, held mid-read on the FIFO ``d/pipe`` (snapshot taken)."""
    fifo = os.path.join(d, "pipe")
    if not os.path.exists(fifo):
        os.mkfifo(fifo)
    p = subprocess.Popen([*DV, "create", "--snapshot", "btrfs", "--read-special", *extra,
                          f"{repo}::{name}", d], env={**os.environ, **env},
                         stderr=subprocess.PIPE)
    # the reader is diskvault inside the snapshot: the FIFO there is the same inode kind,
    # but it is the snapshot's; find the snapshot first, then its FIFO's reader
    snap = wait_for(lambda: snapshots_in(d), "the snapshot")[0]  # type: ignore[index]
    w = wait_for(lambda: fifo_has_reader(os.path.join(d, snap, "pipe")),
                 "diskvault reading the FIFO in the snapshot")
    return p, w, snap


def test_sigterm_removes_the_snapshot_and_a_live_runs_snapshot_is_never_touched(vms):
    d, repo, env = vms
    with open(os.path.join(d, "vm.img"), "wb") as f:
        f.write(os.urandom(1 << 20))
    p, w, snap = _start_held(repo, d, env, "held")
    try:
        # a second run on the same subvolume meanwhile: the first run is alive, so its
        # snapshot is not stale
        r = dv("create", "--snapshot", "btrfs", f"{repo}::other", os.path.join(d, "vm.img"),
               env=env)
        assert "stale" not in r.stderr.decode()
        assert snap in snapshots_in(d)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=DEADLINE)
    finally:
        os.close(w)  # type: ignore[arg-type]
        p.kill() if p.poll() is None else None
    assert p.returncode == 2
    assert "terminated by SIGTERM" in err.decode()
    assert snapshots_in(d) == []
    assert dv("list", "--format", "{archive}{NL}", repo, env=env).stdout.split() == [b"other"]


def test_next_run_removes_the_snapshot_a_sigkilled_run_left(vms):
    d, repo, env = vms
    img = os.path.join(d, "vm.img")
    with open(img, "wb") as f:
        f.write(os.urandom(1 << 20))
    p, w, snap = _start_held(repo, d, env, "killed")
    p.kill()
    p.communicate(timeout=DEADLINE)
    os.close(w)  # type: ignore[arg-type]
    assert snapshots_in(d) == [snap]  # nobody could remove it
    assert btrfs_snap.stale_snapshots(d) == [os.path.join(d, snap)]
    os.unlink(os.path.join(d, "pipe"))
    r = dv("create", "--snapshot", "btrfs", f"{repo}::next", img, env=env)
    assert f"removed stale snapshot {os.path.join(d, snap)}" in r.stderr.decode()
    assert snapshots_in(d) == []


def test_stale_rules_never_match_a_live_process_or_a_foreign_name(vms):
    d, _, _ = vms
    live = os.path.join(d, f".diskvault-snap-{btrfs_snap.own_tag()}-abcd")
    other_boot = os.path.join(d, ".diskvault-snap-" + "0" * 32 + "-1-1-abcd")
    foreign = os.path.join(d, ".diskvault-snap-mine")
    plain_dir = os.path.join(d, ".diskvault-snap-" + "0" * 32 + "-2-2-abcd")
    for s in (live, other_boot, foreign):
        subprocess.run(["btrfs", "subvolume", "snapshot", "-r", d, s], check=True,
                       capture_output=True)
    os.mkdir(plain_dir)  # not a subvolume: never deleted, whatever its name
    try:
        assert btrfs_snap.stale_snapshots(d) == [other_boot]
    finally:
        for s in (live, other_boot, foreign):
            subprocess.run(["btrfs", "subvolume", "delete", s], check=True,
                           capture_output=True)


def test_check_refuses_a_path_not_on_btrfs(tmp_path):
    with pytest.raises(SnapshotError, match="not on a btrfs filesystem"):
        btrfs_snap.Snapshots().check([str(tmp_path)])
