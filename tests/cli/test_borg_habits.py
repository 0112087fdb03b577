"""Habits of Borg users: argument order, placeholders, delete -a GLOB."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess

import pytest
from support import dv, init_repo, needs_tool

MiB = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def disk_image(tmp_path) -> str:
    """An 8 MiB random MBR disk image, one raw partition filling it (nothing unused)."""
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.write(random.Random(10).randbytes(8 * MiB))
    subprocess.run(["sfdisk", "-q", path], input=b"label: dos\n,7MiB,L\n", check=True,
                   capture_output=True)
    return path


@needs_tool("sfdisk")
def test_disk_backup_takes_the_location_first(tmp_path, disk_image):
    repo = str(tmp_path / "repo")
    init_repo(repo)
    with open(disk_image, "rb") as f:
        want = sha(f.read())
    r = dv("disk", "backup", f"{repo}::new", disk_image)
    assert r.stderr == b""
    # the old order still works, with one deprecation line
    r = dv("disk", "backup", disk_image, f"{repo}::old")
    assert r.stderr.decode().splitlines() == [
        "diskvault: warning: `disk backup DEVICE REPO::ARCHIVE` is deprecated: write "
        "`disk backup REPO::ARCHIVE DEVICE`, like create"]
    for name in ("new", "old"):
        assert sha(dv("extract", "--stdout", f"{repo}::{name}").stdout) == want
    # with DISKVAULT_REPO: ::ARCHIVE is the location
    r = dv("disk", "backup", "::env", disk_image, env={"DISKVAULT_REPO": repo})
    assert r.stderr == b""
    assert dv("list", "--short", repo).stdout.decode().split() == ["new", "old", "env"]


@needs_tool("sfdisk")
def test_disk_backup_argument_errors(tmp_path, disk_image):
    repo = str(tmp_path / "repo")
    init_repo(repo)
    for args, msg in [
        ((f"{repo}::x",), "which disk? give --serial SERIAL or a DEVICE/IMAGE"),
        (("--serial", "S1", f"{repo}::x", disk_image),
         "give either --serial or a DEVICE/IMAGE, not both"),
        ((repo, disk_image), f"an archive name is needed: {repo}::ARCHIVE"),
    ]:
        r = dv("disk", "backup", *args, check=False)
        assert r.returncode == 2
        assert r.stderr.decode() == f"diskvault: error: {msg}\n"
    assert dv("list", "--short", repo).stdout == b""


def test_placeholders(tmp_path, monkeypatch):
    from diskvault import __version__
    from diskvault.cli import common

    repo = str(tmp_path / "repo")
    init_repo(repo)
    (tmp_path / "f").write_bytes(b"x")
    dv("create", f"{repo}::{{fqdn}}|{{pid}}|{{uuid4}}|{{version}}", str(tmp_path / "f"))
    (name,) = dv("list", "--short", repo).stdout.decode().split()
    fqdn, pid, uuid4, version = name.split("|")
    assert fqdn == common.fqdn() and fqdn != "localhost"
    assert pid.isdigit() and int(pid) > 1
    assert len(uuid4) == 36 and uuid4[14] == "4"
    assert version == __version__
    # no name service at all: the host name
    def no_dns(*a, **k):
        raise OSError("no resolver")

    monkeypatch.setattr(common.socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(common.socket, "gethostname", lambda: "box")
    assert common.fqdn() == "box"


@needs_tool("borg")
def test_fqdn_is_borgs(tmp_path):
    env = {"BORG_BASE_DIR": str(tmp_path / "borg"), "BORG_PASSPHRASE": "",
           "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes"}
    brepo = str(tmp_path / "borg-repo")
    subprocess.run(["borg", "init", "-e", "none", brepo], env=env, check=True,
                   capture_output=True)
    (tmp_path / "f").write_bytes(b"x")
    subprocess.run(["borg", "create", f"{brepo}::{{fqdn}}-{{hostname}}", "f"], env=env,
                   check=True, capture_output=True, cwd=str(tmp_path))
    borg_name = subprocess.run(["borg", "list", "--short", brepo], env=env, check=True,
                               capture_output=True).stdout.decode().strip()
    repo = str(tmp_path / "repo")
    init_repo(repo)
    dv("create", f"{repo}::{{fqdn}}-{{hostname}}", str(tmp_path / "f"))
    assert dv("list", "--short", repo).stdout.decode().strip() == borg_name


def test_delete_by_glob(tmp_path):
    repo = str(tmp_path / "repo")
    init_repo(repo)
    (tmp_path / "f").write_bytes(b"x")
    for n in ("web-1", "web-2", "db-1"):
        dv("create", f"{repo}::{n}", str(tmp_path / "f"))
    r = dv("delete", "-a", "web-*", "--dry-run", repo)
    assert r.stdout.decode().splitlines() == ["Would delete archive: web-1",
                                              "Would delete archive: web-2"]
    assert dv("list", "--short", repo).stdout.decode().split() == ["web-1", "web-2", "db-1"]
    r = dv("delete", "--glob-archives", "web-*", "--list", repo)
    assert r.stdout.decode().splitlines() == ["Deleting archive: web-1",
                                              "Deleting archive: web-2"]
    assert dv("list", "--short", repo).stdout.decode().split() == ["db-1"]
    r = dv("delete", "-a", "web-*", repo, check=False)
    assert (r.returncode, r.stderr) == (
        1, b"diskvault: warning: no archive matches 'web-*': nothing deleted\n")
    r = dv("delete", "-a", "db-*", f"{repo}::db-1", check=False)
    assert r.returncode == 2 and b"give REPO, not archive names" in r.stderr
    # named archives: all exist, or nothing is deleted
    r = dv("delete", f"{repo}::db-1", "nope", check=False)
    assert r.returncode == 2 and r.stderr == b"diskvault: error: archive 'nope' does not exist\n"
    assert dv("list", "--short", repo).stdout.decode().split() == ["db-1"]
    dv("delete", f"{repo}::db-1")
    assert dv("list", "--short", repo).stdout == b""


@needs_tool("sfdisk")
def test_progress_when_stderr_is_not_a_terminal(tmp_path, disk_image):
    """cron and log files see progress: a last plain line, or Borg-style JSON lines."""
    repo = str(tmp_path / "repo")
    init_repo(repo)
    runs = [
        ("create", ["create", "-p", f"{repo}::a", disk_image]),
        ("disk backup", ["disk", "backup", "--progress", f"{repo}::d", disk_image]),
        ("extract", ["extract", "-p", "--stdout", f"{repo}::a"]),
        ("disk restore", ["disk", "restore", "-p", f"{repo}::d", str(tmp_path / "r.img")]),
        ("check", ["check", "-p", "--verify-data", repo]),
    ]
    for op, args in runs:
        lines = dv(*args).stderr.decode().splitlines()
        assert any(line.startswith(f"{op}: done, ") for line in lines), (op, lines)
    with open(disk_image, "rb") as f, open(tmp_path / "r.img", "rb") as g:
        assert f.read() == g.read()
    r = dv("create", "-p", "--log-json", f"{repo}::j", disk_image)
    last = json.loads(r.stderr.decode().splitlines()[-1])
    assert last["type"] == "progress_percent" and last["finished"] is True
    assert last["msgid"] == "create" and last["current"] == 8 * MiB
