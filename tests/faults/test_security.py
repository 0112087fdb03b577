"""A storage-only attacker against a client that has used the repository before.

Whoever can write to the storage can rewrite ``config`` (not encrypted) and, in an
unencrypted repository, write any manifest. The client remembers each repository's
encryption mode, key fingerprint and highest serial in its security dir (not the
cache), and refuses a repository that changed under it.
"""

from __future__ import annotations

import json
import os
import shutil

import blake3
import msgpack
import pytest
from support import dv, init_repo

from diskvault.crypto.aead import AesGcmCipher, PlainCipher
from diskvault.crypto.ids import IdHasher
from diskvault.crypto.keys import KeyMaterial, wrap_key
from diskvault.repository.compression import Compression
from diskvault.repository.manifest import MANIFEST_AAD, Manifest
from diskvault.repository.objects import ObjectCodec


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write(path: str, data: bytes | bytearray) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _tree(path: str) -> dict[str, bytes]:
    out = {}
    for d, _, fs in os.walk(path):
        for f in fs:
            out[os.path.relpath(os.path.join(d, f), path)] = _read(os.path.join(d, f))
    return out


def _home() -> str:
    return os.environ["HOME"]


def _one_error(r, *needles: str) -> None:
    err = r.stderr.decode()
    assert r.returncode == 2, (r.returncode, err)
    assert err.count("\n") == 1 and err.startswith("diskvault: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


@pytest.fixture
def victim(tmp_path):
    """An encrypted repository this client has used, holding archive a1."""

    def make(mode: str = "repokey") -> tuple[str, dict, bytes]:
        path = str(tmp_path / "victim")
        env = init_repo(path, mode)
        data = os.urandom(200_000)
        (tmp_path / "genuine").write_bytes(data)
        dv("create", f"{path}::a1", str(tmp_path / "genuine"), env=env)
        assert dv("extract", "--stdout", f"{path}::a1", env=env).stdout == data
        return path, env, data

    return make


def plant_unencrypted(tmp_path, victim_path: str, serial: int | None = None) -> bytes:
    """The attack: an unencrypted repository of the attacker's, with an archive a1 of
    his content, put in place of the victim's under the victim's repository id."""
    evil = str(tmp_path / "evil")
    init_repo(evil, "none")
    content = b"attacker's content " * 1000
    (tmp_path / "evil-src").write_bytes(content)
    dv("create", f"{evil}::a1", str(tmp_path / "evil-src"))
    config = msgpack.unpackb(_read(f"{evil}/config"))
    config["repo_id"] = msgpack.unpackb(_read(f"{victim_path}/config"))["repo_id"]
    raw = msgpack.packb(config)
    for name, blob in _tree(evil).items():
        os.makedirs(os.path.dirname(f"{victim_path}/{name}"), exist_ok=True)
        _write(f"{victim_path}/{name}", blob)
    _write(f"{victim_path}/config", raw)
    if serial is not None:  # nothing authenticates an unencrypted manifest: any serial
        codec = ObjectCodec(PlainCipher(), IdHasher(config["id_key"]), Compression.parse("none"))
        m = Manifest.from_bytes(codec.open(MANIFEST_AAD, _read(f"{victim_path}/manifest")))
        m.serial = serial
        _write(f"{victim_path}/manifest", codec.seal(MANIFEST_AAD, m.to_bytes()))
    return content


def test_downgrade_to_none_is_refused_also_without_cache(victim, tmp_path):
    path, env, _ = victim("repokey")
    plant_unencrypted(tmp_path, path)
    r = dv("extract", "--stdout", f"{path}::a1", env=env, check=False)
    _one_error(r, "claims encryption 'none'", "refused")
    assert r.stdout == b""
    before = _tree(path)
    (tmp_path / "new").write_bytes(b"secret plaintext " * 5000)
    r = dv("create", f"{path}::a2", str(tmp_path / "new"), env=env, check=False)
    _one_error(r, "claims encryption 'none'")
    assert _tree(path) == before  # not a byte uploaded
    shutil.rmtree(os.environ["DISKVAULT_CACHE_DIR"])  # the guard is not in the cache
    r = dv("list", path, env=env, check=False)
    _one_error(r, "claims encryption 'none'")
    r = dv("check", "--repair", "--yes", path, env=env, check=False)
    _one_error(r, "claims encryption 'none'")


def test_keyfile_present_for_unencrypted_repository_is_refused(victim, tmp_path):
    path, env, _ = victim("keyfile")
    plant_unencrypted(tmp_path, path)
    # a client that lost its security dir and cache still has the key file
    shutil.rmtree(os.environ["DISKVAULT_SECURITY_DIR"])
    shutil.rmtree(os.environ["DISKVAULT_CACHE_DIR"])
    r = dv("extract", "--stdout", f"{path}::a1", env=env, check=False)
    _one_error(r, "claims to be unencrypted", os.environ["DISKVAULT_KEYS_DIR"])
    assert r.stdout == b""


def test_forged_high_serial_does_not_lock_the_client_out(victim, tmp_path):
    path, env, data = victim("repokey")
    genuine = _tree(path)
    plant_unencrypted(tmp_path, path, serial=10**9)
    _one_error(dv("list", path, env=env, check=False), "claims encryption 'none'")
    shutil.rmtree(path)  # the owner puts the genuine repository back
    for name, blob in genuine.items():
        os.makedirs(os.path.dirname(f"{path}/{name}"), exist_ok=True)
        _write(f"{path}/{name}", blob)
    assert dv("extract", "--stdout", f"{path}::a1", env=env).stdout == data
    (tmp_path / "more").write_bytes(os.urandom(50_000))
    dv("create", f"{path}::a2", str(tmp_path / "more"), env=env)


def test_replaced_key_is_refused(victim, tmp_path):
    """Someone who knows the passphrase (a former key holder) plants a new key and a
    manifest sealed with it: the client sees a key it has never used for this id."""
    path, env, _ = victim("repokey")
    config_raw = _read(f"{path}/config")
    repo_id = msgpack.unpackb(config_raw)["repo_id"]
    km = KeyMaterial.generate()
    _write(f"{path}/keys/repokey", wrap_key(km, repo_id, env["DISKVAULT_PASSPHRASE"]))
    codec = ObjectCodec(AesGcmCipher(km.enc_key), IdHasher(km.id_key), Compression.parse("lz4"))
    m = Manifest(serial=10**12, config_hash=blake3.blake3(config_raw).digest())
    _write(f"{path}/manifest", codec.seal(MANIFEST_AAD, m.to_bytes()))
    opened = dv("list", path, env=env, check=False)
    _one_error(opened, "key is not the one", "refused")
    # nor is the planted key exported as if it were the repository's: the same message
    out = tmp_path / "exported-key"
    r = dv("key", "export", path, str(out), env=env, check=False)
    _one_error(r, "key is not the one", "refused")
    assert r.stderr == opened.stderr and not out.exists()
    r = dv("key", "export", "--paper", path, env=env, check=False)
    _one_error(r, "key is not the one")
    assert r.stdout == b""


def test_key_export_knows_the_genuine_key_without_a_passphrase(victim, tmp_path):
    """The wrapped key last seen to open the repository is exported without asking;
    one wrapped anew by another client (a new passphrase) is unwrapped once and its
    fingerprint compared, then recognised."""
    path, env, _ = victim("repokey")
    assert "DISKVAULT_PASSPHRASE" not in os.environ
    first = dv("key", "export", path, input=b"").stdout  # stdin not a terminal: no prompt
    assert first.startswith(b"DISKVAULT KEY ")
    other = {**env, "DISKVAULT_SECURITY_DIR": str(tmp_path / "other-client"),
             "DISKVAULT_NEW_PASSPHRASE": "new secret"}
    dv("key", "change-passphrase", path, env=other)
    _one_error(dv("key", "export", path, input=b"", check=False), "a passphrase is needed")
    r = dv("key", "export", path, env={"DISKVAULT_PASSPHRASE": "new secret"})
    assert r.stdout.startswith(b"DISKVAULT KEY ") and r.stdout != first
    assert dv("key", "export", path, input=b"").stdout == r.stdout
    # a passphrase this client changed itself needs no unwrapping either
    dv("key", "change-passphrase", path, env={"DISKVAULT_PASSPHRASE": "new secret",
                                               "DISKVAULT_NEW_PASSPHRASE": "third"})
    third = dv("key", "export", path, input=b"").stdout
    assert third not in (first, r.stdout)
    r = dv("list", "--format", "{archive}{NL}", path, env={"DISKVAULT_PASSPHRASE": "third"})
    assert r.stdout == b"a1\n"


def test_unknown_unencrypted_repository_warns_when_a_passphrase_is_set(tmp_path):
    path = str(tmp_path / "plain")
    init_repo(path, "none")
    shutil.rmtree(os.environ["DISKVAULT_SECURITY_DIR"])  # as on another client
    r = dv("list", path)
    assert r.stderr == b""  # no passphrase set: nothing expected to be encrypted
    shutil.rmtree(os.environ["DISKVAULT_SECURITY_DIR"])
    for env in ({"DISKVAULT_PASSPHRASE": "secret"}, {"DISKVAULT_PASSCOMMAND": "echo secret"}):
        r = dv("list", path, env=env)
        assert r.stderr.decode().startswith("diskvault: warning: ") \
            and "is not encrypted, but a passphrase is set" in r.stderr.decode(), r.stderr
        r = dv("list", path, env=env)  # known now: the user has been told
        assert r.stderr == b""
        shutil.rmtree(os.environ["DISKVAULT_SECURITY_DIR"])


def test_security_dir_records_what_was_seen_and_never_the_key(victim):
    path, env, _ = victim("repokey")
    repo_id = msgpack.unpackb(_read(f"{path}/config"))["repo_id"]
    entry = os.path.join(os.environ["DISKVAULT_SECURITY_DIR"], repo_id.hex())
    with open(os.path.join(entry, "security.json")) as f:
        known = json.load(f)
    assert known["mode"] == "repokey" and known["location"] == path
    assert known["serial"] >= 2 and len(known["fingerprint"]) == 32
    assert "security" not in os.listdir(os.environ["DISKVAULT_CACHE_DIR"])


def test_rollback_error_says_what_to_do(victim, tmp_path):
    path, env, data = victim("repokey")
    old = _read(f"{path}/manifest")
    (tmp_path / "a2").write_bytes(os.urandom(10_000))
    dv("create", f"{path}::a2", str(tmp_path / "a2"), env=env)
    _write(f"{path}/manifest", old)  # restored from an older copy, on purpose
    repo_id = msgpack.unpackb(_read(f"{path}/config"))["repo_id"]
    entry = os.path.join(os.environ["DISKVAULT_SECURITY_DIR"], repo_id.hex())
    r = dv("list", path, env=env, check=False)
    _one_error(r, "rolled back", f"delete {entry} and run the command again")
    shutil.rmtree(entry)  # the documented procedure
    r = dv("list", "--format", "{archive}{NL}", path, env=env)
    assert r.stdout.decode().split() == ["a1"]
    assert dv("extract", "--stdout", f"{path}::a1", env=env).stdout == data


def test_serial_of_older_clients_in_the_cache_dir_is_still_honoured():
    from diskvault.errors import ManifestRolledBack
    from diskvault.repository import security

    repo_id = os.urandom(32)
    legacy = os.path.join(os.environ["DISKVAULT_CACHE_DIR"], repo_id.hex())
    os.makedirs(legacy)
    with open(os.path.join(legacy, "security.json"), "w") as f:
        json.dump({"serial": 40}, f)  # what diskvault kept before the security dir
    with pytest.raises(ManifestRolledBack, match="older than the last seen"):
        security.check_serial(repo_id, 39, "repo")
    security.check_serial(repo_id, 40, "repo")
    security.remember(repo_id, mode="repokey", fingerprint="f" * 32, location="repo",
                      serial=41)
    security.remember(repo_id, serial=12)  # a serial never goes down
    assert security.load(repo_id) == security.Known("repokey", "f" * 32, "repo", 41)
