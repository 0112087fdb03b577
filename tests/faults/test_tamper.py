"""Tamper and rollback in an encrypted repository: an older manifest, an archive swapped
for another, objects from a foreign repository, a changed config — all detected."""

from __future__ import annotations

import os
import shutil

import msgpack
import pytest
from support import dv, init_repo


@pytest.fixture
def repo(tmp_path):
    path = str(tmp_path / "repo")
    env = init_repo(path, "repokey")
    for n in ("a1", "a2"):
        (tmp_path / n).write_bytes(os.urandom(300_000))
    dv("create", f"{path}::a1", str(tmp_path / "a1"), env=env)
    return path, env


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _archive_ids(path: str, env: dict) -> dict[str, str]:
    out = dv("list", "--format", "{archive} {id}{NL}", path, env=env).stdout.decode()
    return dict(line.split() for line in out.splitlines())


def test_rolled_back_manifest_is_refused_then_repaired(repo, tmp_path):
    path, env = repo
    old = _read(f"{path}/manifest")
    dv("create", f"{path}::a2", str(tmp_path / "a2"), env=env)
    _write(f"{path}/manifest", old)  # a valid, authentic, but older manifest
    r = dv("list", path, env=env, check=False)
    assert r.returncode == 2 and b"rolled back" in r.stderr, r.stderr
    r = dv("check", path, env=env, check=False)
    assert r.returncode == 1 and b"rolled back" in r.stdout
    dv("check", "--repair", "--yes", path, env=env)  # rebuilt from the archive metadata
    assert sorted(_archive_ids(path, env)) == ["a1", "a2"]
    out = dv("extract", "--stdout", f"{path}::a2", env=env).stdout
    assert out == (tmp_path / "a2").read_bytes()


def test_swapped_archive_metadata_is_detected(repo, tmp_path):
    path, env = repo
    dv("create", f"{path}::a2", str(tmp_path / "a2"), env=env)
    ids = _archive_ids(path, env)
    # a2's metadata object replaced by a1's: both genuine, sealed with the same key
    _write(f"{path}/archives/{ids['a2']}", _read(f"{path}/archives/{ids['a1']}"))
    r = dv("extract", "--stdout", f"{path}::a2", env=env, check=False)
    assert r.returncode == 2 and b"archive 'a2': authentication failed" in r.stderr, r.stderr
    r = dv("check", path, env=env, check=False)
    assert r.returncode == 1 and b"archive 'a2'" in r.stdout
    out = dv("extract", "--stdout", f"{path}::a1", env=env).stdout
    assert out == (tmp_path / "a1").read_bytes()


def test_foreign_manifest_and_pack_are_detected(repo, tmp_path):
    path, env = repo
    other = str(tmp_path / "other")
    init_repo(other, "repokey")
    dv("create", f"{other}::x", str(tmp_path / "a2"), env=env)
    shutil.copy(f"{other}/manifest", f"{path}/manifest")
    r = dv("list", path, env=env, check=False)
    assert r.returncode == 2 and b"manifest: authentication failed" in r.stderr, r.stderr
    dv("check", "--repair", "--yes", path, env=env)
    assert list(_archive_ids(path, env)) == ["a1"]
    # a pack of the other repository planted here: its TOC does not authenticate
    pack = next(os.path.join(d, f) for d, _, fs in os.walk(f"{other}/packs") for f in fs)
    dest = f"{path}/packs/{os.path.basename(os.path.dirname(pack))}"
    os.makedirs(dest, exist_ok=True)
    shutil.copy(pack, dest)
    r = dv("check", path, env=env, check=False)
    assert r.returncode == 1 and os.path.basename(pack)[:16].encode() in r.stdout
    assert b"authentication failed" in r.stdout
    out = dv("extract", "--stdout", f"{path}::a1", env=env).stdout
    assert out == (tmp_path / "a1").read_bytes()


def test_changed_config_is_detected_and_not_repaired(repo):
    path, env = repo
    dv("config", path, "append_only", "1", env=env)
    config = msgpack.unpackb(_read(f"{path}/config"))
    config["append_only"] = False  # an attacker turning append-only off behind our back
    _write(f"{path}/config", msgpack.packb(config))
    r = dv("delete", f"{path}::a1", env=env, check=False)
    assert r.returncode == 2 and b"config does not match the manifest" in r.stderr, r.stderr
    r = dv("check", "--repair", "--yes", path, env=env, check=False)
    assert r.returncode == 2 and b"does not accept a changed config" in r.stderr
    config["append_only"] = True
    _write(f"{path}/config", msgpack.packb(config))
    assert b"a1" in dv("list", path, env=env).stdout
