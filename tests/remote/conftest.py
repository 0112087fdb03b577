"""Fixtures for repositories on the real S3 (SeaweedFS) and SFTP (sshd) test servers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from support import dv


@pytest.fixture(autouse=True)
def _passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    # the one init_repo() sets; every command of these tests runs with it
    monkeypatch.setenv("DISKVAULT_PASSPHRASE", "secret")


@pytest.fixture(params=["s3", "sftp"])
def remote_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh repository location on one of the two remote backends."""
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        return str(server.url(f"{request.node.name[:20]}-{uuid.uuid4().hex[:10]}"))
    server = request.getfixturevalue("sftp_server")
    server.configure_client(Path(os.environ["HOME"]))
    return str(server.url(str(tmp_path / "sftp-repo")))


def restored_sha(location: str, *paths: str, env: dict | None = None) -> str:
    """SHA-256 of ``extract --stdout`` (the items' contents, concatenated)."""
    out = dv("extract", "--stdout", location, *paths, env=env).stdout
    return hashlib.sha256(out).hexdigest()


def file_sha(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def random_file(path: Path, size: int, seed: int) -> Path:
    """Incompressible content, the same for the same seed (so two runs chunk alike)."""
    import random

    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def partitioned_image(path: Path, mib: int = 16, seed: int = 3) -> Path:
    """A GPT disk image with two partitions of random data (no filesystem: all used)."""
    import random

    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(mib << 20)
    subprocess.run(["sfdisk", "-q", str(path)], check=True, capture_output=True,
                   input=b"label: gpt\nsize=5MiB\nsize=6MiB\n")
    with open(path, "r+b") as f:
        for start in (1, 6):  # the partitions sfdisk put at 1 MiB and 6 MiB
            f.seek(start << 20)
            f.write(rnd.randbytes(5 << 20))
    return path
