"""Repository locations → backends, and what a user sees when one is wrong."""

from __future__ import annotations

import os
import time

import pytest

from diskvault.errors import UsageError
from diskvault.storage.local import LocalStore
from diskvault.storage.retry import RetryStore
from diskvault.storage.s3 import S3Store
from diskvault.storage.sftp import SftpStore
from diskvault.storage.url import mask, open_store


def test_plain_and_file_paths(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = open_store("rel/repo")
    assert isinstance(s, LocalStore) and s.path == str(tmp_path / "rel/repo")
    s = open_store("file:///srv/backup/repo")
    assert isinstance(s, LocalStore) and s.path == "/srv/backup/repo"
    s = open_store("file:///srv/with%20space")
    assert isinstance(s, LocalStore) and s.path == "/srv/with space"


@pytest.mark.parametrize(
    ("url", "host", "port", "user", "path"),
    [
        ("sftp://backup@nas.example/srv/repo", "nas.example", None, "backup", "/srv/repo"),
        ("sftp://nas:2222/srv/repo/", "nas", 2222, None, "/srv/repo"),
        ("sftp://u@10.0.0.2:22/~/repos/pc1", "10.0.0.2", 22, "u", "repos/pc1"),
        ("sftp://u%40corp@[fe80::1]:2200/r", "fe80::1", 2200, "u@corp", "/r"),
    ],
)
def test_sftp_locations(url: str, host: str, port: int | None, user: str | None, path: str
                        ) -> None:
    s = open_store(url)
    assert isinstance(s, RetryStore)  # remote stores retry by default
    bare = s.inner
    assert isinstance(bare, SftpStore)
    assert (bare.host, bare.port, bare.user, bare.path) == (host, port, user, path)
    assert bare.location == url
    assert isinstance(open_store(url, retry=False), SftpStore)


def test_s3_endpoint_with_credentials() -> None:
    url = "s3:AKIDEXAMPLE:wJalr%2FK7MDENG%2Bb@http://127.0.0.1:8333/my-bucket/some/repo"
    s = open_store(url, retry=False)
    assert isinstance(s, S3Store)
    assert s.endpoint_url == "http://127.0.0.1:8333"
    assert s.bucket == "my-bucket" and s._prefix == "some/repo/"
    assert s._credentials[:2] == ("AKIDEXAMPLE", "wJalr/K7MDENG+b")
    assert "wJalr" not in s.location and "K7MDENG" not in s.location
    assert s.location == "s3:AKIDEXAMPLE:***@http://127.0.0.1:8333/my-bucket/some/repo"


def test_s3_secret_with_unencoded_slashes_and_plus() -> None:
    s = open_store("s3:AKID:abc/def+ghi@https://s3.example:9000/bkt/r", retry=False)
    assert isinstance(s, S3Store)
    assert s._credentials[:2] == ("AKID", "abc/def+ghi")
    assert s.endpoint_url == "https://s3.example:9000" and s._prefix == "r/"
    assert "def+ghi" not in s.location


def test_s3_aws_and_environment_credentials() -> None:
    s = open_store("s3:/my.bucket-1/path/to/repo", retry=False)
    assert isinstance(s, S3Store)
    assert s.endpoint_url is None and s.bucket == "my.bucket-1"
    assert s._prefix == "path/to/repo/" and s._credentials[:3] == (None, None, None)
    s = open_store("s3:work@/bucket-at-root", retry=False)  # a profile name
    assert isinstance(s, S3Store) and s._credentials[2] == "work" and s._prefix == ""


def test_opening_touches_no_network() -> None:
    t = time.monotonic()
    open_store("s3:K:S@http://192.0.2.1:1/bucket/x")  # TEST-NET: would hang if contacted
    open_store("sftp://nobody@192.0.2.1/x")
    assert time.monotonic() - t < 5


@pytest.mark.parametrize(
    "bad",
    [
        "", "ftp://host/x", "http://host/x", "sftp://host", "sftp://host/", "sftp:/host/x",
        "sftp://host/~/", "sftp://host:99999/x", "s3:", "s3:/", "s3:/bucket_with_underscore/x",
        "s3:/UPPER/x", "s3:/ab/x", "s3:ftp://host/bucket/x", "s3:http://host", "file://",
        "s3:/bucket/a/../b", "user@host:repo", "sftp:host/x", "file:relative",
    ],
)
def test_unparseable_locations(bad: str) -> None:
    with pytest.raises(UsageError) as e:
        open_store(bad)
    msg = str(e.value)
    assert "\n" not in msg
    assert "sftp://" in msg or "bucket" in msg or "port" in msg or "path" in msg


@pytest.mark.parametrize(
    "bad",
    ["s3:KEY:hunter2x@ftp://host/bucket/x", "s3:KEY:hunter2x@http://host",
     "s3:KEY:hun@ter2x@http://host/b_b/x", "sftp://user:hunter2x@host/"],
)
def test_secrets_never_appear_in_errors(bad: str) -> None:
    with pytest.raises(UsageError) as e:
        open_store(bad)
    assert "hun" not in str(e.value) and "ter2x" not in str(e.value)


def test_mask() -> None:
    assert mask("s3:K:S3CR3T@http://h/b/p") == "s3:K:***@http://h/b/p"
    assert mask("s3:K:S3/CR+3T@/b/p") == "s3:K:***@/b/p"
    assert mask("s3:http://h/b/p") == "s3:http://h/b/p"
    assert mask("sftp://u:pw@h/x") == "sftp://u:***@h/x"
    assert mask(os.sep + "plain") == os.sep + "plain"
