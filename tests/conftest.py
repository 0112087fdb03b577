"""Test isolation: every test gets its own HOME, key, cache and security dirs, and a
weak KDF (the CLI runs through tests/dv_entry.py, which weakens it the same way)."""

from __future__ import annotations

import os

import pytest
from dv_entry import WEAK_KDF

# real SeaweedFS (S3) and sshd (SFTP) servers on 127.0.0.1, started once per session
pytest_plugins = ["storage.servers"]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (long sweeps, extra guest boots) run only when asked for:
    ``-m slow`` or ``DISKVAULT_SLOW=1``; CI runs the rest."""
    if "slow" in (config.getoption("-m") or "") or os.environ.get("DISKVAULT_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow (or DISKVAULT_SLOW=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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
