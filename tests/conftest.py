"""Test isolation: every test gets its own HOME, key and cache dirs, and a weak KDF."""

from __future__ import annotations

import pytest

# real SeaweedFS (S3) and sshd (SFTP) servers on 127.0.0.1, started once per session
pytest_plugins = ["storage.servers"]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DISKVAULT_KEYS_DIR", str(home / "keys"))
    monkeypatch.setenv("DISKVAULT_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("DISKVAULT_TESTONLY_WEAKEN_KDF", "1")
    for var in ("DISKVAULT_REPO", "DISKVAULT_PASSPHRASE", "DISKVAULT_PASSCOMMAND"):
        monkeypatch.delenv(var, raising=False)
    yield
