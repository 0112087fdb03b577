"""What only the remote backends do: buckets, credentials, host keys, error messages."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest
from storage.servers import free_port

from diskvault.errors import RepositoryExists, StorageError
from diskvault.storage.retry import is_transient
from diskvault.storage.s3 import S3Store
from diskvault.storage.sftp import ACCEPT_NEW_ENV, SftpStore
from diskvault.storage.url import open_store

# --- S3 -------------------------------------------------------------------------------


def test_s3_create_makes_the_bucket_and_works_at_its_root(s3_server) -> None:
    bucket = f"dv-new-{uuid.uuid4().hex[:10]}"
    store = open_store(s3_server.url("", bucket=bucket).rstrip("/"), retry=False)
    assert isinstance(store, S3Store) and store._prefix == ""
    assert not store.exists()
    store.create()
    assert store.exists()
    store.store("config", b"c")
    store.store("packs/ab/1", b"12")
    assert dict(store.list("")) == {"config": 1, "packs/ab/1": 2}
    with pytest.raises(RepositoryExists):
        open_store(s3_server.url("", bucket=bucket).rstrip("/"), retry=False).create()
    store.close()


def test_s3_refuses_a_prefix_holding_foreign_objects(s3_server) -> None:
    prefix = f"foreign-{uuid.uuid4().hex[:8]}"
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"{prefix}/notes.txt", Body=b"x")
    store = open_store(s3_server.url(prefix), retry=False)
    assert store.exists()
    with pytest.raises(RepositoryExists):
        store.create()


def test_s3_wrong_secret_is_one_permanent_line(s3_server) -> None:
    url = (f"s3:{s3_server.access_key}:not-the-secret-42@{s3_server.endpoint}/"
           f"{s3_server.bucket}/x")
    store = open_store(url, retry=False)
    with pytest.raises(StorageError) as e:
        store.store("config", b"x")
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    assert "not-the-secret-42" not in msg and "SignatureDoesNotMatch" in msg
    assert not is_transient(e.value)


def test_s3_unreachable_endpoint_is_transient() -> None:
    store = open_store(f"s3:k:s@http://127.0.0.1:{free_port()}/bucket/x", retry=False)
    with pytest.raises(StorageError) as e:
        store.load("config")
    assert is_transient(e.value) and "\n" not in str(e.value)
    assert "127.0.0.1" in str(e.value)


def test_s3_credentials_from_environment(s3_server, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    store = open_store(f"s3:{s3_server.endpoint}/{s3_server.bucket}/env-{uuid.uuid4().hex[:8]}",
                       retry=False)
    store.create()
    store.store("config", b"env")
    assert store.load("config") == b"env"


# --- SFTP -----------------------------------------------------------------------------


def _sftp(server, tmp_path: Path) -> SftpStore:
    store = open_store(server.url(str(tmp_path / "repo")), retry=False)
    assert isinstance(store, SftpStore)
    return store


def test_sftp_unknown_host_key_is_refused_with_a_hint(sftp_server, tmp_path, monkeypatch
                                                      ) -> None:
    home = Path(os.environ["HOME"])
    sftp_server.configure_client(home, trust_host=False)
    with pytest.raises(StorageError, match=ACCEPT_NEW_ENV) as e:
        _sftp(sftp_server, tmp_path).exists()
    assert not is_transient(e.value)
    # the test switch: accept and remember it, as OpenSSH's accept-new does
    monkeypatch.setenv(ACCEPT_NEW_ENV, "1")
    assert _sftp(sftp_server, tmp_path).exists() is False
    assert (home / ".ssh/known_hosts").read_text() == sftp_server.host_key_line()
    monkeypatch.delenv(ACCEPT_NEW_ENV)
    store = _sftp(sftp_server, tmp_path)  # now trusted without the switch
    store.create()
    assert store.exists()
    store.close()


def test_sftp_changed_host_key_is_always_refused(sftp_server, tmp_path, monkeypatch) -> None:
    home = Path(os.environ["HOME"])
    sftp_server.configure_client(home)
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                   check=True)
    kind, key = Path(f"{other}.pub").read_text().split()[:2]
    (home / ".ssh/known_hosts").write_text(f"[127.0.0.1]:{sftp_server.port} {kind} {key}\n")
    monkeypatch.setenv(ACCEPT_NEW_ENV, "1")  # accepting new keys never means changed ones
    with pytest.raises(StorageError, match="CHANGED") as e:
        _sftp(sftp_server, tmp_path).exists()
    assert not is_transient(e.value)


def test_sftp_unauthorized_key_is_a_permanent_error(sftp_server, tmp_path) -> None:
    home = Path(os.environ["HOME"])
    sftp_server.configure_client(home)
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                   check=True)
    (home / ".ssh/config").write_text(
        f"Host 127.0.0.1\n    IdentityFile {stranger}\n    IdentitiesOnly yes\n")
    with pytest.raises(StorageError, match="refused") as e:
        _sftp(sftp_server, tmp_path).exists()
    assert not is_transient(e.value)


def test_sftp_ssh_config_supplies_user_port_and_host(sftp_server, tmp_path) -> None:
    home = Path(os.environ["HOME"])
    sftp_server.configure_client(home)
    (home / ".ssh/config").write_text(
        f"Host backupbox\n    HostName 127.0.0.1\n    Port {sftp_server.port}\n"
        f"    User {sftp_server.user}\n    IdentityFile {sftp_server.user_key}\n")
    store = open_store(f"sftp://backupbox{tmp_path}/repo", retry=False)
    store.create()
    store.store("config", b"via ssh_config")
    assert (tmp_path / "repo/config").read_bytes() == b"via ssh_config"
    store.close()


def test_sftp_store_is_fsynced_and_renamed(sftp_server, tmp_path) -> None:
    sftp_server.configure_client(Path(os.environ["HOME"]))
    store = _sftp(sftp_server, tmp_path)
    store.create()
    store.store("packs/ab/x", b"v1")
    store.store("packs/ab/x", b"v2")
    assert store._fsync_ok  # OpenSSH has fsync@openssh.com; a rejection would clear it
    assert os.listdir(tmp_path / "repo/packs/ab") == ["x"]  # no temp file left behind
    assert (tmp_path / "repo/packs/ab/x").read_bytes() == b"v2"
    store.close()
