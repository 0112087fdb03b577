"""Test isolation: every test gets its own HOME, key, cache and security dirs, and a
weak KDF (the CLI runs through tests/dv_entry.py, which weakens it the same way)."""

from __future__ import annotations

import os

import pytest
from dv_entry import WEAK_KDF

# real SeaweedFS (S3) and sshd (SFTP) servers on 127.0.0.1, started once per session
pytest_plugins = ["storage.servers"]


def pytest_configure(config):
    """Session-wide isolation too: module- and session-scoped fixtures run before the
    per-test fixture below, and must not touch the real ~/.config or ~/.cache (a
    security entry left there by one run would make a later run with the same seeded
    repository ids see a "rollback")."""
    import tempfile

    base = tempfile.mkdtemp(prefix="diskvault-tests-home-")
    os.environ["HOME"] = base
    os.environ["DISKVAULT_KEYS_DIR"] = os.path.join(base, "keys")
    os.environ["DISKVAULT_CACHE_DIR"] = os.path.join(base, "cache")
    os.environ["DISKVAULT_SECURITY_DIR"] = os.path.join(base, "security")
    _cache_bytecode()
    # numpy's OpenBLAS starts a thread per core at import and they spin: ~0.1 s of CPU
    # per CLI start, taken from whatever runs beside it (QEMU under TCG, servers, the
    # CLI's own workers). diskvault does no linear algebra.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _cache_bytecode() -> None:
    """The suite starts the CLI ~2,000 times, each a fresh interpreter (tests/dv_entry.py)
    whose start is mostly imports. Where PYTHONDONTWRITEBYTECODE is set, every one of them
    compiled all of diskvault again (~0.15 s of a ~0.5 s start). Bytecode is cached once,
    in a temp dir outside the source tree (pyc files are checked against their source's
    mtime and size, so a stale one is never used)."""
    import tempfile

    if not os.environ.pop("PYTHONDONTWRITEBYTECODE", None):
        return  # bytecode is written the usual way (__pycache__ beside the sources)
    os.environ.setdefault("PYTHONPYCACHEPREFIX",
                          os.path.join(tempfile.gettempdir(), "diskvault-test-pycache"))


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
