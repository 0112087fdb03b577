"""Byte-identical round trips through the CLI, as a user runs it."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import threading
import time

import pytest
from support import (
    DV_ENTRY,
    allocated,
    dv,
    init_repo,
    loop_device,
    make_vm_image,
    needs_loop,
    sha256_file,
)


@pytest.fixture
def image(tmp_path):
    p = str(tmp_path / "vm.img")
    make_vm_image(p, mib=24)
    return p


@pytest.mark.parametrize("encryption", ["none", "repokey", "keyfile"])
@pytest.mark.parametrize("compression", ["none", "lz4", "zstd,3", "auto,zstd,6"])
def test_image_round_trip_every_mode(tmp_path, image, encryption, compression):
    repo = str(tmp_path / "repo")
    env = init_repo(repo, encryption, "--pack-size", "3MiB")
    dv("create", "-C", compression, f"{repo}::a", image, env=env)
    out = dv("extract", "--stdout", f"{repo}::a", env=env).stdout
    assert hashlib.sha256(out).hexdigest() == sha256_file(image)


def test_extract_to_file_sparse_and_dense(tmp_path, image):
    repo = str(tmp_path / "repo")
    env = init_repo(repo)
    dv("create", f"{repo}::a", image, env=env)
    for sparse in (True, False):
        dest = tmp_path / f"out{sparse}"
        dest.mkdir()
        dv("extract", *(["--sparse"] if sparse else []), f"{repo}::a", env=env, cwd=str(dest))
        restored = str(dest / image.lstrip("/"))
        assert sha256_file(restored) == sha256_file(image)
        assert os.path.getsize(restored) == os.path.getsize(image)
        if sparse:
            # 24 MiB image: 4.8 random + 4.8 text + 2.4 half-random MiB of non-zero data
            assert allocated(restored) <= 13 << 20, allocated(restored)
        else:
            assert allocated(restored) >= 23 << 20


def test_second_backup_stores_about_the_change(tmp_path, image):
    repo = str(tmp_path / "repo")
    env = init_repo(repo, "repokey")
    dv("create", f"{repo}::one", image, env=env)
    with open(image, "r+b") as f:  # rewrite 3 blocks of 1 MiB with new random data
        for off in (0, 5 << 20, 10 << 20):
            f.seek(off)
            f.write(os.urandom(1 << 20))
    r = dv("create", "--json", f"{repo}::two", image, env=env)
    import json

    stats = json.loads(r.stdout)["archive"]["stats"]
    # each 1 MiB change dirties one 4 MiB chunk: at most 3 chunks are new
    assert stats["new_plain"] <= 3 * (4 << 20), stats
    assert stats["dedup"] >= 8 << 20
    out = dv("extract", "--stdout", f"{repo}::two", env=env).stdout
    assert hashlib.sha256(out).hexdigest() == sha256_file(image)


def test_stdin_and_names(tmp_path):
    repo = str(tmp_path / "repo")
    env = init_repo(repo, "repokey")
    data = os.urandom(3 << 20) + bytes(5 << 20) + b"tail" * 1000
    dv("create", "--stdin-name", "disk.raw", f"{repo}::s", "-", input=data, env=env)
    assert dv("extract", "--stdout", f"{repo}::s", env=env).stdout == data
    listing = dv("list", "--format", "{path} {size}{NL}", f"{repo}::s", env=env).stdout
    assert listing == f"disk.raw {len(data)}\n".encode()


def test_fifo_with_writer(tmp_path):
    repo = str(tmp_path / "repo")
    env = init_repo(repo)
    fifo = str(tmp_path / "pipe")
    os.mkfifo(fifo)
    data = os.urandom(2 << 20) * 2

    def writer():
        time.sleep(0.5)
        with open(fifo, "wb") as f:
            f.write(data)

    t = threading.Thread(target=writer)
    t.start()
    dv("create", "--read-special", f"{repo}::f", fifo, env=env)
    t.join()
    assert dv("extract", "--stdout", f"{repo}::f", env=env).stdout == data


def test_content_from_command(tmp_path):
    repo = str(tmp_path / "repo")
    env = init_repo(repo)
    cmd = [sys.executable, "-c", "import sys; sys.stdout.buffer.write(b'x' * 3000000)"]
    dv("create", "--content-from-command", f"{repo}::c", "--", *cmd, env=env)
    assert dv("extract", "--stdout", f"{repo}::c", env=env).stdout == b"x" * 3000000
    bad = [sys.executable, "-c", "import sys; print('partial'); sys.exit(3)"]
    r = dv("create", "--content-from-command", f"{repo}::bad", "--", *bad, env=env, check=False)
    assert r.returncode == 2 and b"exit code 3" in r.stderr
    assert b"bad" not in dv("list", "--short", repo, env=env).stdout


def test_directory_tree_with_metadata(tmp_path):
    src = tmp_path / "src"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"hello\n" * 1000)
    (src / "sub" / "b.bin").write_bytes(os.urandom(300000))
    (src / "sub" / "deep" / "empty").write_bytes(b"")
    os.symlink("../a.txt", src / "sub" / "link")
    os.link(src / "a.txt", src / "sub" / "hard")
    sparse = src / "sparse"
    with open(sparse, "wb") as f:
        f.seek(10 << 20)
        f.write(b"end")
    os.chmod(src / "a.txt", 0o640)
    os.setxattr(src / "a.txt", "user.note", b"kept")
    os.utime(src / "sub" / "b.bin", ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    repo = str(tmp_path / "repo")
    env = init_repo(repo, "repokey")
    dv("create", f"{repo}::t", str(src), env=env)
    dest = tmp_path / "dest"
    dest.mkdir()
    dv("extract", "--sparse", f"{repo}::t", env=env, cwd=str(dest))
    out = dest / str(src).lstrip("/")
    for rel in ("a.txt", "sub/b.bin", "sub/deep/empty", "sparse", "sub/hard"):
        assert sha256_file(str(out / rel)) == sha256_file(str(src / rel)), rel
    assert os.readlink(out / "sub" / "link") == "../a.txt"
    assert os.stat(out / "a.txt").st_ino == os.stat(out / "sub" / "hard").st_ino
    assert stat.S_IMODE(os.stat(out / "a.txt").st_mode) == 0o640
    assert os.getxattr(out / "a.txt", "user.note") == b"kept"
    assert os.stat(out / "sub" / "b.bin").st_mtime_ns == 1_600_000_000_123_456_789
    assert allocated(str(out / "sparse")) < 1 << 20
    names = dv("list", "--short", f"{repo}::t", env=env).stdout.decode().split("\n")
    assert str(src / "sub" / "link").lstrip("/") in names


@needs_loop
def test_loop_device_read_special(tmp_path, image):
    repo = str(tmp_path / "repo")
    env = init_repo(repo, "repokey")
    with loop_device(image) as dev:
        dv("create", "--read-special", f"{repo}::d", dev, env=env)
        name = dev.lstrip("/")
        assert dv("list", "--short", f"{repo}::d", env=env).stdout.decode().strip() == name
        out = dv("extract", "--stdout", f"{repo}::d", env=env).stdout
        assert hashlib.sha256(out).hexdigest() == sha256_file(image)
    # restore onto an existing block device of the same size
    target = str(tmp_path / "target.img")
    with open(target, "wb") as f:
        f.write(os.urandom(24 << 20))  # stale content must be overwritten, zeros included
    with loop_device(target) as tdev:
        dv("extract", "--stdout", f"{repo}::d", env=env)
        subprocess.run(f"{sys.executable} {DV_ENTRY} extract --stdout {repo}::d "
                       f"| dd of={tdev} bs=4M status=none", shell=True, check=True,
                       env={**os.environ, **env})
        assert sha256_file(tdev) == sha256_file(image)


@needs_loop
def test_read_special_follows_symlink_to_device(tmp_path):
    """/dev/disk/by-id names are symlinks: --read-special reads the device they name."""
    img = str(tmp_path / "small.img")
    with open(img, "wb") as f:
        f.write(os.urandom(3 << 20))
    repo = str(tmp_path / "repo")
    env = init_repo(repo)
    with loop_device(img) as dev:
        link = tmp_path / "by-id-serial"
        os.symlink(dev, link)
        dv("create", "--read-special", f"{repo}::l", str(link), env=env)
    out = dv("extract", "--stdout", f"{repo}::l", env=env).stdout
    assert hashlib.sha256(out).hexdigest() == sha256_file(img)
