"""Test isolation: every test gets its own HOME, key, cache and security dirs, and a
weak KDF (the CLI runs through tests/dv_entry.py, which weakens it the same way)."""

from __future__ import annotations

import pytest
from dv_entry import WEAK_KDF

# real SeaweedFS (S3) and sshd (SFTP) servers on 127.0.0.1, started once per session
pytest_plugins = ["storage.servers"]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DISKVAULT_KEYS_DIR", str(home / "keys"))
    monkeypatch.setenv("DISKVAULT_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("DISKVAULT_SECURITY_DIR", str(home / "security"))
    from diskvault.crypto import kdf  # in-process keys: the same weak KDF as dv_entry.py

    monkeypatch.setattr(kdf, "NEW_KEY_COST", dict(WEAK_KDF))
    for var in ("DISKVAULT_REPO", "DISKVAULT_PASSPHRASE", "DISKVAULT_PASSCOMMAND",
                "DISKVAULT_NEW_PASSPHRASE", "DISKVAULT_PASSPHRASE_EMPTY_OK"):
        monkeypatch.delenv(var, raising=False)
    yield
