"""The repository lifecycle through the CLI: check, repair, heal, prune, compact,
append-only, keys, delete/rename/info under damage."""

from __future__ import annotations

import json
import os

import pytest
from support import dv, init_repo, one_error

from diskvault.repository.keymanage import PAPER_HEADER


@pytest.fixture
def repo(tmp_path):
    path = str(tmp_path / "repo")
    env = init_repo(path, "repokey", "--pack-size", "128KiB")
    files = {}
    for n in ("a", "b"):
        f = tmp_path / f"{n}.img"
        f.write_bytes(os.urandom(700_000) + bytes(300_000) + os.urandom(200_000))
        files[n] = f
        dv("create", "--chunker-params", "fixed,65536", f"{path}::{n}", str(f), env=env)
    return path, env, files


def _packs_of(path: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(f"{path}/packs") for f in fs)


def test_check_healthy_in_every_mode(repo):
    path, env, _ = repo
    for extra in ([], ["--verify-data"], ["--verify-data-subset", "50%"], ["--archives-only"],
                  ["--repository-only"], ["--archives-only", "--verify-data"], ["-a", "b*"]):
        r = dv("check", *extra, path, env=env)
        assert b"check: no problems found" in r.stdout, (extra, r.stdout)
    report = json.loads(dv("check", "--json", "--verify-data", path, env=env).stdout)
    assert report["ok"] and report["problems"] == []
    assert report["stats"]["archives"] == 2 and report["stats"]["verified_packs"] > 4


def test_lost_pack_is_named_repaired_reported_on_restore_and_healed(repo):
    path, env, files = repo
    # the largest pack holds file data (the item-metadata chunks are small): pack names
    # are content hashes of encrypted data, so a position in the sorted list is random
    victim = max(_packs_of(path), key=os.path.getsize)
    os.unlink(victim)
    r = dv("check", path, env=env, check=False)
    out = r.stdout.decode()
    assert r.returncode == 1 and os.path.basename(victim)[:16] in out
    damaged = [ln for ln in out.splitlines() if ": bytes " in ln]
    assert damaged and all("cannot be restored" in ln for ln in damaged)
    report = json.loads(dv("check", "--json", path, env=env, check=False).stdout)
    items = [p for p in report["problems"] if p["kind"] == "item"]
    assert items and all(p["ranges"] for p in items)
    name, first = items[0]["archive"], items[0]["ranges"][0]
    # repair needs a confirmation; nothing is changed without one
    one_error(dv("check", "--repair", path, env=env, check=False), "--yes")
    r = dv("check", "--repair", "--yes", path, env=env, check=False)
    assert r.returncode == 1 and b"marked damaged" in r.stdout  # the lost bytes stay lost
    r = dv("extract", "--stdout", f"{path}::{name}", env=env, check=False)
    one_error(r, f"bytes {first[0]}-{first[1]} cannot be restored")
    # a new backup of the same image stores the lost chunks again: the archive heals
    dv("create", "--chunker-params", "fixed,65536", f"{path}::again", str(files[name]),
       env=env)
    r = dv("check", "--verify-data", path, env=env)
    assert b"healed" in r.stdout and b"no problems found" in r.stdout
    assert dv("extract", "--stdout", f"{path}::{name}", env=env).stdout == \
        files[name].read_bytes()
    r = dv("check", "--repair", "--yes", path, env=env)
    assert b"mark cleared" in r.stdout


def test_prune_list_series_and_compact(repo, tmp_path):
    path, env, files = repo
    for n in ("host1-1", "host1-2", "host2-1", "host1-3"):
        dv("create", f"{path}::{n}", str(files["a"]), env=env)
    r = dv("prune", "--dry-run", "--list", "--keep-last", "1", "-a", "host1-*", path, env=env)
    lines = r.stdout.decode().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("Keeping archive (rule: secondly #1):") and "host1-3" in lines[0]
    assert all(ln.startswith("Would prune:") for ln in lines[1:])
    assert b"host1-1" in dv("list", path, env=env).stdout  # dry run: nothing changed
    r = dv("prune", "--list", "--keep-last", "1", "-a", "host1-*", path, env=env)
    assert r.stdout.decode().count("Pruning archive") == 2
    names = dv("list", "--short", path, env=env).stdout.decode().split()
    assert sorted(names) == ["a", "b", "host1-3", "host2-1"]
    dv("delete", f"{path}::b", env=env)
    before = sum(os.path.getsize(p) for p in _packs_of(path))
    r = json.loads(dv("compact", "--json", path, env=env).stdout)
    after = sum(os.path.getsize(p) for p in _packs_of(path))
    assert r["bytes_freed"] > 500_000 and before - after > 500_000
    for n in ("a", "host1-3", "host2-1"):
        assert dv("extract", "--stdout", f"{path}::{n}", env=env).stdout == files["a"].read_bytes()
    assert b"no problems found" in dv("check", "--verify-data", path, env=env).stdout


def test_append_only(repo):
    path, env, files = repo
    assert dv("config", path, "append_only", env=env).stdout.strip() == b"0"
    dv("config", path, "append_only", "1", env=env)
    assert b"(append-only)" in dv("info", path, env=env).stdout
    for args, what in ((["delete", f"{path}::a"], "delete"),
                       (["rename", f"{path}::a", "z"], "rename"),
                       (["prune", "--keep-last", "1", path], "prune"),
                       (["compact", path], "compact")):
        one_error(dv(*args, env=env, check=False), f"append-only: {what} is not allowed")
    dv("create", f"{path}::c", str(files["a"]), env=env)  # backups still work
    one_error(dv("config", path, "append_only", "0", env=env, check=False),
              "--allow-disable-append-only")
    dv("config", "--allow-disable-append-only", path, "append_only", "0", env=env)
    dv("delete", f"{path}::c", env=env)
    assert b"no problems found" in dv("check", path, env=env).stdout


def test_rename_survives_a_manifest_rebuild_and_info_survives_damage(repo, tmp_path):
    path, env, files = repo
    dv("rename", f"{path}::a", "renamed", env=env)
    os.unlink(f"{path}/manifest")
    one_error(dv("list", path, env=env, check=False), "manifest is missing")
    r = dv("check", "--repair", "--yes", path, env=env)
    assert b"manifest rebuilt: 2 archive(s)" in r.stdout
    assert sorted(dv("list", "--short", path, env=env).stdout.split()) == [b"b", b"renamed"]
    ids = dict(ln.split() for ln in dv("list", "--format", "{archive} {id}{NL}", path,
                                       env=env).stdout.decode().splitlines())
    with open(f"{path}/archives/{ids['b']}", "r+b") as f:
        f.truncate(10)
    # seen from another machine (this one has a good copy of the metadata in its cache)
    elsewhere = {**env, "DISKVAULT_CACHE_DIR": str(tmp_path / "other-cache")}
    assert b"1 damaged: run 'check'" in dv("info", path, env=elsewhere).stdout
    dv("delete", f"{path}::b", env=env)  # a damaged archive can be deleted
    assert dv("extract", "--stdout", f"{path}::renamed", env=env).stdout == \
        files["a"].read_bytes()


def test_key_export_import_paper_and_passphrase(repo, tmp_path):
    path, env, _ = repo
    text, paper = tmp_path / "key.txt", tmp_path / "key.paper"
    dv("key", "export", path, str(text), env=env)
    dv("key", "export", "--paper", path, str(paper), env=env)
    assert paper.read_text().startswith(PAPER_HEADER)
    os.unlink(f"{path}/keys/repokey")
    one_error(dv("list", path, env=env, check=False), "keys/repokey")
    for export in (paper, text):
        dv("key", "import", path, str(export), env=env)
        assert b"a" in dv("list", path, env=env).stdout
    lines = paper.read_text().splitlines()
    lines[3] = lines[3][:8] + ("0" if lines[3][8] != "0" else "1") + lines[3][9:]
    (tmp_path / "typo").write_text("\n".join(lines) + "\n")
    one_error(dv("key", "import", path, str(tmp_path / "typo"), env=env, check=False),
              "line 3")
    other = str(tmp_path / "other")
    init_repo(other, "repokey")
    one_error(dv("key", "import", other, str(text), env=env, check=False),
              "another repository")
    dv("key", "change-passphrase", path, env={**env, "DISKVAULT_NEW_PASSPHRASE": "fresh"})
    one_error(dv("list", path, env=env, check=False), "passphrase is wrong")
    assert b"a" in dv("list", path, env={"DISKVAULT_PASSPHRASE": "fresh"}).stdout


def test_keyfile_repository_key_roundtrip(tmp_path):
    path = str(tmp_path / "repo")
    env = init_repo(path, "keyfile")
    (tmp_path / "f").write_bytes(os.urandom(10000))
    dv("create", f"{path}::x", str(tmp_path / "f"), env=env)
    export = tmp_path / "exported"
    dv("key", "export", path, str(export), env=env)
    keys = os.environ["DISKVAULT_KEYS_DIR"]
    for f in os.listdir(keys):
        os.unlink(os.path.join(keys, f))
    one_error(dv("list", path, env=env, check=False), "key file", keys)
    dv("key", "import", path, str(export), env=env)
    assert dv("extract", "--stdout", f"{path}::x", env=env).stdout == (tmp_path / "f").read_bytes()
