"""The storage server dies under a running command: SeaweedFS (S3) and sshd (SFTP) are
killed with SIGKILL and started again while ``create`` and ``extract`` run.

- a ``create`` rides out the outage (retries with backoff) and completes;
- an ``extract`` does too, and writes exactly the archived bytes;
- a ``create`` whose retry budget runs out fails with one clear error line, and leaves
  a repository that checks clean, keeps every archive, and takes the same backup again.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from remote.conftest import restored_sha
from remote.test_remote_resume import stored_packs
from support import DV, dv, init_repo

MiB = 1 << 20
CHUNKER = ["--chunker-params", "fixed,262144"]


@dataclass
class Backend:
    url: str
    server: Any  # storage.servers.ServerProcess
    packs: Any  # () -> number of packs stored


@pytest.fixture(params=["s3", "sftp"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        prefix = f"faults-{uuid.uuid4().hex[:10]}"
        return Backend(server.url(prefix), server, lambda: len(stored_packs(server, prefix)))
    server = request.getfixturevalue("sftp_server")
    server.configure_client(Path(os.environ["HOME"]))
    path = tmp_path / "sftp-repo"

    def packs() -> int:
        return sum(".tmp" not in f for _, _, fs in os.walk(path / "packs") for f in fs)

    return Backend(server.url(str(path)), server, packs)


def start_create(url: str, name: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*DV, "create", *CHUNKER, "--stdin-name", name,
         f"{url}::{name}", "-"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})})


def finish_later(p: subprocess.Popen, rest: bytes) -> tuple[threading.Thread, dict]:
    """Feed the rest of the input and collect the outcome, in the background."""
    out: dict = {}

    def run() -> None:
        out["stdout"], out["stderr"] = p.communicate(rest, timeout=240)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def wait_packs(b: Backend, at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while b.packs() < at_least:
        assert time.monotonic() < deadline, f"fewer than {at_least} packs after {timeout} s"
        time.sleep(0.05)


def error_lines(stderr: bytes) -> list[str]:
    text = stderr.decode(errors="replace")
    assert "Traceback" not in text, text
    return [ln for ln in text.splitlines() if ln.startswith("diskvault: error:")]


def start_extract(url: str) -> subprocess.Popen:
    return subprocess.Popen([*DV, "extract", "--stdout", url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.timeout(300)
def test_server_killed_during_create_and_extract(backend: Backend) -> None:
    url, server = backend.url, backend.server
    init_repo(url, "repokey", "--pack-size", "1MiB")
    rnd = random.Random(3)
    data = {n: rnd.randbytes(12 * MiB) for n in ("base", "a", "c")}
    sha = {n: hashlib.sha256(d).hexdigest() for n, d in data.items()}
    dv("create", *CHUNKER, "--stdin-name", "base", f"{url}::base", "-", input=data["base"])

    # under way when the server dies: a restore, a backup, and a backup whose retry
    # budget is shorter than the outage
    ext = start_extract(f"{url}::base")
    assert ext.stdout is not None and ext.stderr is not None
    head = ext.stdout.read(1 * MiB)  # most of the archive is still to be fetched
    creates = {"a": start_create(url, "a"),
               "c": start_create(url, "c", env={"DISKVAULT_RETRY_SECONDS": "2"})}
    for n, p in creates.items():
        before = backend.packs()
        assert p.stdin is not None
        p.stdin.write(data[n][: 6 * MiB])
        p.stdin.flush()
        wait_packs(backend, before + 3)
    server.kill()
    restored: dict[str, bytes] = {}
    reader = threading.Thread(target=lambda: restored.__setitem__("rest", ext.stdout.read()))
    reader.start()  # reads on into the outage: the extract has to fetch, and retry
    finishing = {n: finish_later(p, data[n][6 * MiB:]) for n, p in creates.items()}
    finishing["c"][0].join()
    server.start()  # after the short budget ran out, well within the default one
    finishing["a"][0].join()
    reader.join()
    ext.wait(timeout=240)

    # the restore and the backup "a" rode out the outage (and said so, once)
    err = ext.stderr.read()
    assert ext.returncode == 0 and not error_lines(err) and b"retrying" in err, err
    assert hashlib.sha256(head + restored["rest"]).hexdigest() == sha["base"]
    out_a = finishing["a"][1]
    assert creates["a"].returncode == 0, out_a["stderr"].decode()
    assert not error_lines(out_a["stderr"]) and b"retrying" in out_a["stderr"]
    # "c" failed with one clear line
    out_c = finishing["c"][1]
    lines = error_lines(out_c["stderr"])
    assert creates["c"].returncode == 2 and len(lines) == 1, out_c["stderr"].decode()
    assert "gave up after" in lines[0]

    # the repository is consistent: checks clean, keeps its archives, takes "c" again
    assert sorted(dv("list", "--short", url).stdout.decode().split()) == ["a", "base"]
    assert "no problems found" in dv("check", url).stdout.decode()
    dv("create", *CHUNKER, "--stdin-name", "c", f"{url}::c", "-", input=data["c"])
    for n in data:
        assert restored_sha(f"{url}::{n}") == sha[n], n
    assert "no problems found" in dv("check", "--verify-data", url).stdout.decode()
