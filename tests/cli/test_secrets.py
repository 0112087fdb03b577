"""Secrets: S3 credentials never printed or stored, empty and reused passphrases refused,
a hostile KDF cost refused, and no test-only weakening in the production crypto."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
import uuid

import msgpack
import pytest
from support import DV_ENTRY, dv, init_repo

from diskvault.crypto import keys
from diskvault.crypto.kdf import KdfParams
from diskvault.crypto.keys import KeyMaterial, unwrap_key, wrap_key
from diskvault.errors import IntegrityError, PassphraseWrong
from diskvault.repository.repo import Repository
from diskvault.storage.url import open_store

SECRET = "TopSecret/Key+9"


def _one_error(r, *needles: str) -> str:
    err = r.stderr.decode()
    assert r.returncode == 2, (r.returncode, err)
    assert err.count("\n") == 1 and err.startswith("diskvault: error: "), err
    for n in needles:
        assert n in err, err
    return err


def test_usage_errors_mask_the_s3_secret():
    loc = f"s3:AKID:{SECRET}@http://127.0.0.1:9/bucket"
    err = _one_error(dv("extract", "--stdout", loc, check=False), "an archive name is needed",
                     "s3:AKID:***@")
    assert SECRET not in err
    err = _one_error(dv("init", "-e", "none", f"{loc}::x", check=False),
                     "takes a repository, not an archive", "s3:AKID:***@")
    assert SECRET not in err


def test_s3_secret_is_not_stored_in_the_archive(s3_server, tmp_path):
    url = s3_server.url(f"secrets-{uuid.uuid4().hex[:10]}")
    assert f":{s3_server.secret_key}@" in url
    env = init_repo(url, "none")
    r = dv("create", "--stdin-name", "s", f"{url}::a", "-", input=b"data" * 1000, env=env)
    info = dv("info", "--json", f"{url}::a", env=env).stdout.decode()
    assert s3_server.secret_key not in info and ":***@" in info
    with Repository.open(open_store(url), lambda creating: "", lock=None) as repo:
        meta = repo.load_archive(repo.archive_ref("a"))
    stored = " ".join(meta["command_line"])
    assert s3_server.secret_key not in stored and ":***@" in stored, stored
    assert s3_server.secret_key not in (r.stdout + r.stderr).decode()


def test_empty_passphrase_needs_consent(tmp_path):
    path = str(tmp_path / "repo")
    r = dv("init", "-e", "repokey", path, env={"DISKVAULT_PASSPHRASE": ""}, check=False)
    _one_error(r, "passphrase is empty", "DISKVAULT_PASSPHRASE_EMPTY_OK=1")
    assert not os.path.exists(path)  # nothing written
    env = {"DISKVAULT_PASSPHRASE": "", "DISKVAULT_PASSPHRASE_EMPTY_OK": "1"}
    dv("init", "-e", "repokey", path, env=env)
    dv("list", path, env={"DISKVAULT_PASSPHRASE": ""})


def _run_on_tty(args: list[str], env: dict, answers: list[tuple[bytes, bytes]]
                ) -> tuple[int, bytes]:
    """Run the CLI on a pseudo-terminal, answering each prompt once it is shown."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal and stdin
        os.execve(sys.executable, [sys.executable, DV_ENTRY, *args], {**os.environ, **env})
    out, seen = b"", 0  # seen: where the output after the last answered prompt starts
    deadline = time.monotonic() + 120
    ended = False
    try:
        while time.monotonic() < deadline:
            if answers and answers[0][0] in out[seen:]:
                prompt, answer = answers.pop(0)
                seen = out.index(prompt, seen) + len(prompt)
                os.write(fd, answer)  # the prompt is shown: echo is off, input not flushed
                continue
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                b = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                b = b""
            if not b:
                ended = True
                break
            out += b
    finally:
        if not ended:
            os.kill(pid, signal.SIGKILL)  # hung on a prompt never answered
        os.close(fd)
        status = os.waitpid(pid, 0)[1]
    assert not answers, f"prompts not seen: {answers!r} in {out!r}"
    return os.waitstatus_to_exitcode(status), out


def test_change_passphrase_never_takes_the_current_one(tmp_path):
    path = str(tmp_path / "repo")
    env = init_repo(path, "repokey", passphrase="old")
    # not on a terminal and no DISKVAULT_NEW_PASSPHRASE: refused, not re-wrapped
    r = dv("key", "change-passphrase", path, env=env, check=False)
    _one_error(r, "DISKVAULT_NEW_PASSPHRASE")
    r = dv("key", "change-passphrase", path, env={**env, "DISKVAULT_NEW_PASSPHRASE": ""},
           check=False)
    _one_error(r, "passphrase is empty")
    dv("list", path, env=env)  # still the old one
    # on a terminal, with DISKVAULT_PASSPHRASE set: the new one comes from the prompt
    code, out = _run_on_tty(["key", "change-passphrase", path], env,
                            [(b"Enter new passphrase: ", b"new1\n"),
                             (b"Enter the same passphrase again: ", b"new1\n")])
    assert code == 0 and b"passphrase changed" in out, out
    _one_error(dv("list", path, env=env, check=False), "passphrase is wrong")
    dv("list", path, env={"DISKVAULT_PASSPHRASE": "new1"})
    dv("key", "change-passphrase", path,
       env={"DISKVAULT_PASSPHRASE": "new1", "DISKVAULT_NEW_PASSPHRASE": "new2"})
    dv("list", path, env={"DISKVAULT_PASSPHRASE": "new2"})


def _blob_with_cost(memory_kib: int, time_cost: int) -> bytes:
    repo_id = b"r" * 32
    d = msgpack.unpackb(wrap_key(KeyMaterial.generate(), repo_id, "pw"))
    d["kdf"]["memory_kib"], d["kdf"]["time_cost"] = memory_kib, time_cost
    return msgpack.packb(d)


def test_kdf_cost_ceiling_is_what_a_client_would_choose(monkeypatch):
    runs = []

    def fake_kdf(passphrase: str, params: KdfParams) -> bytes:
        runs.append(params.memory_kib)
        return b"k" * 32  # not the key: authentication fails after the KDF ran

    hostile = [_blob_with_cost(m, t) for m, t in (((2 << 20) + 1, 3), (4 << 20, 1), (65536, 11))]
    ceiling = _blob_with_cost(2 << 20, 10)
    monkeypatch.setattr(keys, "derive_key", fake_kdf)
    for blob in hostile:
        with pytest.raises(IntegrityError, match="unreasonable KDF"):
            unwrap_key(blob, b"r" * 32, "pw")
    assert runs == []  # refused before any memory was asked for
    with pytest.raises(PassphraseWrong):
        unwrap_key(ceiling, b"r" * 32, "pw")  # the ceiling itself is accepted
    assert runs == [2 << 20]


def test_production_cli_ignores_the_old_test_switch(tmp_path):
    """The weak test KDF lives in tests/dv_entry.py only: the real CLI makes real keys."""
    path = str(tmp_path / "repo")
    env = {**os.environ, "DISKVAULT_PASSPHRASE": "pw", "DISKVAULT_TESTONLY_WEAKEN_KDF": "1"}
    subprocess.run([sys.executable, "-m", "diskvault", "init", "-e", "repokey", path],
                   env=env, check=True, capture_output=True)
    with open(f"{path}/keys/repokey", "rb") as f:
        kdf = msgpack.unpackb(f.read())["kdf"]
    assert (kdf["memory_kib"], kdf["time_cost"]) == (65536, 3)


def test_init_tells_how_to_keep_the_key(tmp_path):
    for mode in ("repokey", "keyfile"):
        path = str(tmp_path / mode)
        r = dv("init", "-e", mode, path, env={"DISKVAULT_PASSPHRASE": "pw"})
        out = r.stdout.decode()
        assert f"diskvault key export {path} FILE" in out and "--paper" in out, out
        assert "nobody can read the backups" in out
    assert "not encrypted" in dv("init", "-e", "none", str(tmp_path / "n")).stdout.decode()
