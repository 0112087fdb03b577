"""Edge cases found in review: each was a wrong result or a crash before its fix."""

from __future__ import annotations

import os

import pytest
from support import dv, init_repo, sha256_file

from diskvault.archive.create import CreateOptions, create_archive
from diskvault.errors import SourceError
from diskvault.repository.repo import Repository
from diskvault.source.paths import SourceOptions, walk
from diskvault.storage.local import LocalStore


def test_extract_never_writes_through_a_symlink(tmp_path):
    src, outside, dest = tmp_path / "s", tmp_path / "outside", tmp_path / "dest"
    for d in (src, outside, dest):
        d.mkdir()
    (outside / "victim").write_bytes(b"secret")
    os.symlink(outside, src / "link")
    repo = str(tmp_path / "repo")
    env = init_repo(repo)
    # the archive holds a symlink and a file "below" it
    dv("create", f"{repo}::esc", str(src / "link"), str(src / "link" / "victim"), env=env)
    (outside / "victim").write_bytes(b"changed")
    r = dv("extract", f"{repo}::esc", env=env, cwd=str(dest), check=False)
    assert (outside / "victim").read_bytes() == b"changed"
    assert r.returncode == 2 and b"Traceback" not in r.stderr


def test_extract_never_follows_a_symlink_already_in_the_target(tmp_path):
    plain, outside, dest = tmp_path / "plain", tmp_path / "outside", tmp_path / "dest"
    for d in (plain, outside, dest):
        d.mkdir()
    (plain / "f").write_bytes(b"new")
    repo = str(tmp_path / "repo")
    env = init_repo(repo)
    dv("create", f"{repo}::p", str(plain), env=env)
    target = dest / str(plain).lstrip("/")
    target.parent.mkdir(parents=True)
    os.symlink(outside, target)  # the archive's directory is a link to elsewhere here
    r = dv("extract", f"{repo}::p", env=env, cwd=str(dest), check=False)
    assert r.returncode == 2 and b"symlink" in r.stderr
    assert not (outside / "f").exists()


def test_undecodable_file_names_round_trip(tmp_path):
    src = tmp_path / "s"
    src.mkdir()
    bad = os.fsencode(str(src)) + b"/bad\xff\xfe"
    with open(bad, "wb") as f:
        f.write(b"payload")
    repo = str(tmp_path / "repo")
    env = init_repo(repo)
    dv("create", f"{repo}::n", str(src), env=env)
    dest = tmp_path / "d"
    dest.mkdir()
    dv("extract", f"{repo}::n", env=env, cwd=str(dest))
    with open(os.fsencode(str(dest)) + bad, "rb") as f:
        assert f.read() == b"payload"
    assert b"bad" in dv("list", "--short", f"{repo}::n", env=env).stdout


def test_file_that_shrinks_while_read_fails_instead_of_inventing_zeros(tmp_path):
    path = tmp_path / "shrinks"
    path.write_bytes(os.urandom(9 << 20))
    repo = Repository.init(LocalStore(str(tmp_path / "repo")), "none", lambda c: "")

    def sources():
        for s in walk([str(path)], SourceOptions()):
            os.truncate(path, 1 << 20)  # after open and stat, before the reads
            yield s

    with pytest.raises(SourceError, match="shrank"):
        create_archive(repo, "a", sources(), CreateOptions())
    assert "a" not in repo.load_manifest().archives
    repo.close()


def test_selected_hard_link_gets_its_master_content(tmp_path):
    src = tmp_path / "hl"
    src.mkdir()
    (src / "a").write_bytes(b"data" * 1000)
    os.link(src / "a", src / "b")
    os.link(src / "a", src / "c")
    repo = str(tmp_path / "repo")
    env = init_repo(repo)
    dv("create", f"{repo}::h", str(src), env=env)
    rel = str(src).lstrip("/")
    out = dv("extract", "--stdout", f"{repo}::h", f"{rel}/b", env=env).stdout
    assert out == b"data" * 1000
    dest = tmp_path / "d"
    dest.mkdir()
    dv("extract", f"{repo}::h", f"{rel}/b", f"{rel}/c", env=env, cwd=str(dest))
    b, c = dest / rel / "b", dest / rel / "c"
    assert b.read_bytes() == c.read_bytes() == b"data" * 1000
    assert os.stat(b).st_ino == os.stat(c).st_ino
    assert not (dest / rel / "a").exists()


def test_parent_relative_paths_are_stored_below_the_root(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    (tmp_path / "up.bin").write_bytes(os.urandom(50000))
    (work / "here").write_bytes(b"x")
    repo = str(tmp_path / "repo")
    env = init_repo(repo)
    dv("create", f"{repo}::r", "../up.bin", "here", env=env, cwd=str(work))
    assert dv("list", "--short", f"{repo}::r", env=env).stdout.split() == [b"up.bin", b"here"]
    dest = tmp_path / "d"
    dest.mkdir()
    dv("extract", f"{repo}::r", env=env, cwd=str(dest))
    assert sha256_file(str(dest / "up.bin")) == sha256_file(str(tmp_path / "up.bin"))


def test_file_where_a_directory_belongs_is_one_clear_error(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(b"x")
    repo = str(tmp_path / "repo")
    env = init_repo(repo)
    dv("create", f"{repo}::a", str(src), env=env)
    dest = tmp_path / "d"
    (dest / str(src).lstrip("/")).mkdir(parents=True)
    (dest / str(src).lstrip("/") / "sub").write_bytes(b"in the way")
    r = dv("extract", f"{repo}::a", env=env, cwd=str(dest), check=False)
    assert r.returncode == 2 and b"not a directory" in r.stderr
    assert b"internal error" not in r.stderr


def test_archive_name_with_control_characters_refused(tmp_path):
    repo = str(tmp_path / "repo")
    env = init_repo(repo)
    r = dv("create", f"{repo}::bad\nname", "-", input=b"x", env=env, check=False)
    assert r.returncode == 2 and b"invalid archive name" in r.stderr


def test_existing_name_refused_before_the_command_runs(tmp_path):
    repo = str(tmp_path / "repo")
    env = init_repo(repo)
    dv("create", f"{repo}::x", "-", input=b"1", env=env)
    marker = tmp_path / "ran"
    r = dv("create", "--content-from-command", f"{repo}::x", "--", "touch", str(marker),
           env=env, check=False)
    assert r.returncode == 2 and b"already exists" in r.stderr
    assert not marker.exists()
