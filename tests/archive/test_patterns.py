"""Path patterns of `extract` and `list` (archive/patterns.py), in process and as a user
runs them: globs select, a pattern that matched nothing is named (exit 1), none
matching at all is an error (exit 2) that writes nothing."""

from __future__ import annotations

import os

import pytest
from support import dv, init_repo

from diskvault.archive.patterns import PathMatcher
from diskvault.errors import UsageError

PATHS = ["etc", "etc/passwd", "etcx", "home/ann/doc/a.txt", "home/ann/doc/b.md",
         "home/bob/doc", "home/bob/x/doc/c.txt", "var/log/syslog", "var/log/x.log",
         "x[1]", "srv/www/index.html"]


@pytest.mark.parametrize("pattern, want", [
    ("etc", ["etc", "etc/passwd"]),  # a path and what is below it, not "etcx"
    ("/etc/", ["etc", "etc/passwd"]),
    ("home/*/doc", ["home/ann/doc/a.txt", "home/ann/doc/b.md", "home/bob/doc"]),
    ("**/*.txt", ["home/ann/doc/a.txt", "home/bob/x/doc/c.txt"]),
    ("home/**/doc", ["home/ann/doc/a.txt", "home/ann/doc/b.md", "home/bob/doc",
                     "home/bob/x/doc/c.txt"]),
    ("var/log/?????", ["var/log/x.log"]),
    ("home/[a-b]?[!b]/doc/*.md", ["home/ann/doc/b.md"]),
    ("sh:var/*", ["var/log/syslog", "var/log/x.log"]),
    ("fm:home/*.txt", ["home/ann/doc/a.txt", "home/bob/x/doc/c.txt"]),  # * spans /
    ("re:\\.(md|html)$", ["home/ann/doc/b.md", "srv/www/index.html"]),
    ("pp:x[1]", ["x[1]"]),
    ("x[1]", []),  # a glob: the class [1] matches "1", not "[1]"
])
def test_pattern_styles(pattern, want):
    m = PathMatcher.parse([pattern])
    assert [p for p in PATHS if m(p)] == want
    assert m.unmatched() == ([] if want else [pattern])


def test_bad_regular_expression_is_a_usage_error():
    with pytest.raises(UsageError, match="invalid regular expression"):
        PathMatcher.parse(["re:("])


def test_extract_and_list_with_globs(tmp_path):
    src = tmp_path / "src"
    for rel in ("a/one.txt", "a/two.bin", "b/three.txt", "b/sub/four.txt"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(os.urandom(1000) + rel.encode())
    repo = str(tmp_path / "repo")
    env = init_repo(repo, "none")
    dv("create", f"{repo}::g", "a", "b", env=env, cwd=str(src))
    r = dv("list", "--short", f"{repo}::g", "**/*.txt", env=env)
    assert sorted(r.stdout.split()) == [b"a/one.txt", b"b/sub/four.txt", b"b/three.txt"]
    dest = tmp_path / "d1"
    dest.mkdir()
    dv("extract", f"{repo}::g", "*/*.txt", env=env, cwd=str(dest))  # one level only
    got = sorted(os.path.relpath(os.path.join(d, f), dest)
                 for d, _, fs in os.walk(dest) for f in fs)
    assert got == ["a/one.txt", "b/three.txt"]
    assert (dest / "a/one.txt").read_bytes() == (src / "a/one.txt").read_bytes()
    # one pattern matched, one did not: the files are there, the other is named, exit 1
    dest = tmp_path / "d2"
    dest.mkdir()
    r = dv("extract", f"{repo}::g", "b/sub", "nope/*", env=env, cwd=str(dest), check=False)
    assert r.returncode == 1
    assert r.stderr == b"diskvault: warning: pattern 'nope/*' matched no item\n"
    assert (dest / "b/sub/four.txt").read_bytes() == (src / "b/sub/four.txt").read_bytes()
    r = dv("list", "--short", f"{repo}::g", "a/*.bin", "*.iso", env=env, check=False)
    assert r.returncode == 1 and r.stdout == b"a/two.bin\n"
    assert b"'*.iso' matched no item" in r.stderr
    # nothing matched at all: an error, nothing written
    dest = tmp_path / "d3"
    dest.mkdir()
    r = dv("extract", f"{repo}::g", "*.iso", env=env, cwd=str(dest), check=False)
    assert r.returncode == 2 and r.stderr.count(b"\n") == 1 and b"*.iso" in r.stderr
    assert os.listdir(dest) == []
