"""Shared test helpers: skips for missing root/tools, loop devices, running the CLI."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from diskvault.storage.local import LocalStore

# the CLI as tests run it: tests/dv_entry.py (a weak KDF, test-only), else as users do
DV_ENTRY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dv_entry.py")
DV = [sys.executable, DV_ENTRY]


def have_root() -> bool:
    return os.geteuid() == 0


def have_tool(name: str) -> bool:
    return shutil.which(name) is not None


def _loop_works() -> bool:
    return have_root() and have_tool("losetup") and os.path.exists("/dev/loop-control")


needs_root = pytest.mark.skipif(not have_root(), reason="needs root")
needs_loop = pytest.mark.skipif(not _loop_works(), reason="needs root and loop devices (losetup)")


def needs_tool(*names: str) -> pytest.MarkDecorator:
    missing = [n for n in names if not have_tool(n)]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")


@contextlib.contextmanager
def loop_device(
    image: str, offset: int = 0, sizelimit: int | None = None, read_only: bool = False
) -> Iterator[str]:
    """Attach ``image`` (or a byte range of it) to a free loop device; detach afterwards."""
    cmd = ["losetup", "-f", "--show"]
    if offset:
        cmd += ["-o", str(offset)]
    if sizelimit:
        cmd += ["--sizelimit", str(sizelimit)]
    if read_only:
        cmd.append("-r")
    dev = subprocess.run(cmd + [image], check=True, capture_output=True, text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def sha256_file(path: str, size: int | None = None) -> str:
    h = hashlib.sha256()
    left = size
    with open(path, "rb") as f:
        while left is None or left > 0:
            b = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not b:
                break
            h.update(b)
            if left is not None:
                left -= len(b)
    return h.hexdigest()


def dv(*args: str, input: bytes | None = None, check: bool = True, env: dict | None = None,
       cwd: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the diskvault CLI in a subprocess (as a user would) and return the result."""
    e = dict(os.environ)
    if env:
        e.update(env)
    r = subprocess.run([*DV, *args], input=input,
                       capture_output=True, env=e, cwd=cwd, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(
            f"diskvault {' '.join(args)} exited {r.returncode}: {r.stderr.decode(errors='replace')}"
        )
    return r


def one_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Assert the CLI failed the way every error must: exit 2, one line, no traceback,
    naming each of ``needles``; return the line."""
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err, (r.returncode, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("diskvault: error: "), err
    for n in needles:
        assert n in err, (n, err)
    return err


def flip_byte(path: str, offset: int, mask: int = 0x10) -> None:
    """Bit rot: XOR one byte of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def make_vm_image(path: str, mib: int = 24, seed: int = 1) -> None:
    """A VM-disk-like image: random, text-like, zero and hole regions (1 MiB each)."""
    import random

    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"abcdefghijklmnop ") for _ in range(rnd.randint(2, 9)))
             for _ in range(2000)]
    with open(path, "wb") as f:
        for i in range(mib):
            r = i % 5
            if r == 0:
                f.write(rnd.randbytes(1 << 20))
            elif r == 1:
                f.write(b" ".join(rnd.choice(words) for _ in range(200000))[: 1 << 20])
            elif r == 2:
                f.write(bytes(1 << 20))  # written zeros
            elif r == 3:
                f.seek(1 << 20, 1)  # a hole
            else:
                half = rnd.randbytes(1 << 19)
                f.write(half + bytes(1 << 19))
        f.truncate(mib << 20)


def init_repo(path: str, encryption: str = "none", *extra: str,
              passphrase: str = "secret") -> dict:
    """Create a repository; return the env (passphrase) commands need.

    A local repository is made by the CLI's own ``main`` in this process: the suite makes
    ~230 of them as setup, and a fresh interpreter costs ~0.3 s of imports each time.
    Remote ones (SFTP, S3: connections, ``--rsh``) and every test of ``init`` itself run
    the CLI in a subprocess, as users do."""
    env = {"DISKVAULT_PASSPHRASE": passphrase}
    argv = ["init", "-e", encryption, *extra, path]
    if ":" in path or "--rsh" in extra:
        dv(*argv, env=env)
    else:
        cli_in_process(*argv, env=env)
    return env


def cli_in_process(*args: str, env: dict | None = None) -> str:
    """Run one CLI command in this process, as ``dv`` would in a child (the same weak
    KDF, ``env`` on top of the environment); return its stdout, fail on a nonzero exit.
    For setup steps only: what a command does to its process (signal dispositions,
    malloc tuning, the environment) is undone or kept away from the test process."""
    import io
    import signal
    from unittest import mock

    from dv_entry import WEAK_KDF

    from diskvault.cli import main as cli_main
    from diskvault.crypto import kdf

    out, err = io.StringIO(), io.StringIO()
    cost = dict(kdf.NEW_KEY_COST)
    sigpipe = signal.getsignal(signal.SIGPIPE)
    kdf.NEW_KEY_COST.clear()
    kdf.NEW_KEY_COST.update(WEAK_KDF)
    try:
        with mock.patch.dict(os.environ, env or {}), \
                mock.patch.object(cli_main, "_tune_malloc", lambda: None), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_main.main(list(args))
    finally:
        signal.signal(signal.SIGPIPE, sigpipe)
        kdf.NEW_KEY_COST.clear()
        kdf.NEW_KEY_COST.update(cost)
    if code != 0:
        raise AssertionError(f"diskvault {' '.join(args)} exited {code}: {err.getvalue()}")
    return out.getvalue()


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


class CountingStore(LocalStore):
    """A local store that records the name of every object it loads, so a test can assert
    what a command downloaded. ``remote=True`` makes it pass for a store across a network:
    the local cache then keeps archive metadata and block fingerprints for it."""

    def __init__(self, path: str, remote: bool = False) -> None:
        super().__init__(path)
        self.remote = remote
        self.loads: list[str] = []

    def load(self, name: str, offset: int = 0, size: int | None = None) -> bytes:
        self.loads.append(name)
        return super().load(name, offset, size)
