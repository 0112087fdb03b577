"""Bad input: one clear line on stderr, exit code 2, no traceback, repository unchanged."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support import DV, DV_ENTRY, dv, init_repo, needs_root, needs_tool


def snapshot(repo: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(repo):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, repo)] = fh.read()
    return out


def one_error_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    err = r.stderr.decode()
    assert r.returncode == 2, (r.returncode, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("diskvault: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def repo(tmp_path):
    path = str(tmp_path / "repo")
    env = init_repo(path, "repokey")
    src = tmp_path / "data"
    src.write_bytes(os.urandom(100000))
    dv("create", f"{path}::first", str(src), env=env)
    return path, env


def test_nonexistent_path(repo, tmp_path):
    path, env = repo
    before = snapshot(path)
    r = dv("create", f"{path}::x", str(tmp_path / "nope"), env=env, check=False)
    one_error_line(r, "no such file")
    assert snapshot(path) == before


def test_wrong_passphrase(repo):
    path, _ = repo
    r = dv("list", path, env={"DISKVAULT_PASSPHRASE": "wrong"}, check=False)
    one_error_line(r, "passphrase is wrong")


def test_no_passphrase_without_terminal(repo):
    path, _ = repo
    r = subprocess.run([*DV, "list", path], capture_output=True,
                       stdin=subprocess.DEVNULL)
    one_error_line(r, "DISKVAULT_PASSPHRASE")


def test_missing_key_file(tmp_path):
    path = str(tmp_path / "repo")
    env = init_repo(path, "keyfile")
    keys = os.environ["DISKVAULT_KEYS_DIR"]
    for f in os.listdir(keys):
        os.unlink(os.path.join(keys, f))
    r = dv("list", path, env=env, check=False)
    one_error_line(r, "key file", keys)


def test_not_a_repository(tmp_path):
    r = dv("list", str(tmp_path), check=False)
    one_error_line(r, "is not a diskvault repository")
    r = dv("list", str(tmp_path / "missing"), check=False)
    one_error_line(r, f"{tmp_path / 'missing'} does not exist")


def test_init_twice(repo):
    path, env = repo
    r = dv("init", "-e", "none", path, env=env, check=False)
    one_error_line(r, "already exists")


def test_existing_archive_name(repo, tmp_path):
    path, env = repo
    before = snapshot(path)
    r = dv("create", f"{path}::first", str(tmp_path / "data"), env=env, check=False)
    one_error_line(r, "already exists")
    assert snapshot(path) == before


def test_invalid_format_key(repo):
    path, env = repo
    one_error_line(dv("list", "--format", "{bogus}", path, env=env, check=False), "bogus")
    one_error_line(dv("list", "--format", "{size", f"{path}::first", env=env, check=False),
                   "--format")


def test_missing_archive(repo):
    path, env = repo
    one_error_line(dv("extract", "--stdout", f"{path}::nope", env=env, check=False),
                   "does not exist")


def test_fifo_without_writer_times_out(repo, tmp_path):
    path, env = repo
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    before = snapshot(path)
    r = dv("create", "--read-special", "--read-special-timeout", "1", f"{path}::f", fifo,
           env=env, check=False, timeout=60)
    one_error_line(r, "no writer")
    assert snapshot(path) == before


def test_bad_option_values(repo):
    path, env = repo
    one_error_line(dv("create", "-C", "gzip", f"{path}::a", "-", env=env, check=False),
                   "compression")
    one_error_line(dv("create", "--chunker-params", "fixed,10", f"{path}::a", "-", env=env,
                      check=False), "chunker")


@needs_root
def test_unreadable_device(repo, tmp_path):
    path, env = repo
    # a block device node of a major number no driver claims: open fails (ENXIO)
    node = str(tmp_path / "nodev")
    os.mknod(node, 0o600 | 0o060000, os.makedev(240, 77))
    r = dv("create", "--read-special", f"{path}::d", node, env=env, check=False)
    one_error_line(r, "nodev")


@needs_root
@needs_tool("mount")
def test_disk_full_on_extract_target(repo, tmp_path):
    path, env = repo
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 << 20))
    dv("create", f"{path}::big", str(big), env=env)
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        r = dv("extract", f"{path}::big", env=env, cwd=str(mnt), check=False)
        one_error_line(r, "no space left")
        r = subprocess.run(f"{sys.executable} {DV_ENTRY} extract --stdout {path}::big > {mnt}/out",
                           shell=True, capture_output=True, env={**os.environ, **env})
        one_error_line(r, "no space left")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
