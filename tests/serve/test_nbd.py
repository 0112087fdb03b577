"""serve-nbd with real clients (nbdinfo, nbdcopy, qemu-img) against ``extract --stdout``."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from serve.nbd_client import CMD_WRITE, Client, NbdError
from support import dv, init_repo, make_vm_image

needs_nbd_tools = pytest.mark.skipif(
    any(not os.path.exists(f"/usr/bin/{t}") for t in ("nbdinfo", "nbdcopy", "qemu-img")),
    reason="needs nbdinfo, nbdcopy (libnbd-bin) and qemu-img (qemu-utils)")
pytestmark = needs_nbd_tools

CHUNK = 256 << 10


@contextmanager
def serving(*args: str, env: dict) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start ``serve-nbd ARGS``; yield (URI it printed, process); stop it afterwards."""
    e = {**os.environ, **env}
    p = subprocess.Popen([sys.executable, "-m", "diskvault", "serve-nbd", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e)
    try:
        assert p.stdout is not None
        ready, _, _ = select.select([p.stdout], [], [], 120)  # generous: a busy machine
        line = p.stdout.readline().decode().strip() if ready else ""
        assert line.startswith("nbd"), f"no URI printed: {line!r} " + (
            p.stderr.read().decode() if p.poll() is not None and p.stderr else "")
        yield line, p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in (p.stdout, p.stderr):
            if f:
                f.close()


def run(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr}"
    return r.stdout


@pytest.fixture
def image_repo(tmp_path: Path) -> tuple[str, dict, Path]:
    """Archive ``a`` of a 16 MiB VM-like image; returns (repo, env, extract --stdout file)."""
    repo, img = str(tmp_path / "repo"), str(tmp_path / "vm.img")
    make_vm_image(img, 16)
    env = init_repo(repo, "repokey")
    dv("create", "--chunker-params", f"fixed,{CHUNK}", f"{repo}::a", img, env=env)
    want = tmp_path / "want.img"
    want.write_bytes(dv("extract", "--stdout", f"{repo}::a", env=env).stdout)
    return repo, env, want


def test_image_export_matches_extract(image_repo, tmp_path: Path) -> None:
    repo, env, want = image_repo
    with serving("--port", "0", f"{repo}::a", env=env) as (uri, _):
        assert uri.startswith("nbd://127.0.0.1:")
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(want))
        out = tmp_path / "copy.img"
        run("nbdcopy", uri, str(out))
        assert out.read_bytes() == want.read_bytes()
        listing = run("nbdinfo", "--list", uri)
        assert f'export="{str(tmp_path).strip("/")}/vm.img"' in listing
        assert "is_read_only: true" in listing
        assert "base:allocation" in listing
        # the holes: make_vm_image has zeros in MiB 2 and a hole in MiB 3 of every 5
        data = want.read_bytes()
        holes = []
        for line in run("nbdinfo", "--map", uri).splitlines():
            off, n, flags, *_ = line.split()
            if int(flags) == 3:  # hole,zero
                holes.append((int(off), int(n)))
                assert data[int(off) : int(off) + int(n)] == bytes(int(n))
        assert (2 << 20, 2 << 20) in holes and sum(n for _, n in holes) >= 6 << 20


def test_several_clients_at_once(image_repo, tmp_path: Path) -> None:
    repo, env, want = image_repo
    with serving("--port", "0", "--cache-size", "2M", f"{repo}::a", env=env) as (uri, _):
        procs = [subprocess.Popen(["nbdcopy", "--connections=2", uri, str(tmp_path / f"c{i}")],
                                  stderr=subprocess.PIPE) for i in range(4)]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
        for i in range(4):
            assert (tmp_path / f"c{i}").read_bytes() == want.read_bytes()
        # and pipelined random reads on raw connections, structured and simple replies
        data = want.read_bytes()
        rnd = random.Random(5)
        for structured in (True, False):
            c = Client(uri, structured=structured)
            reqs = {}
            for _ in range(64):
                off = rnd.randrange(len(data) - 1)
                n = rnd.randrange(1, min(len(data) - off, 1 << 20) + 1)
                reqs[c.send(0, off, n)] = (off, n)
            for _ in range(64):
                cookie, got = c.reply(reqs)
                off, n = reqs[cookie]
                assert got == data[off : off + n]
            c.close()


def test_writes_refused_and_bad_ranges(image_repo) -> None:
    repo, env, want = image_repo
    size = want.stat().st_size
    with serving("--port", "0", f"{repo}::a", env=env) as (uri, _):
        c = Client(uri)
        assert c.size == size and c.flags & 2  # read-only
        c.send(CMD_WRITE, 0, 512, bytes(512))
        with pytest.raises(NbdError) as e:
            c.reply()
        assert e.value.errno == 1  # EPERM
        c.send(0, size - 10, 20)
        with pytest.raises(NbdError) as e:
            c.reply()
        assert e.value.errno == 22  # EINVAL
        assert c.pread(size - 10, 10) == want.read_bytes()[-10:]  # still usable
        c.close()
        for _ in range(3):  # clients that hang up before their reply is written
            gone = Client(uri)
            gone.send(0, 0, size)
            gone.f.close()
            gone.s.close()
        c = Client(uri)
        assert c.pread(0, size) == want.read_bytes()  # the server lives on
        c.close()
        with pytest.raises(NbdError) as e:
            Client(uri, export="nope")
        assert e.value.errno == 6 and "no export 'nope'" in e.value.msg  # ERR_UNKNOWN


def test_damaged_chunk_is_an_io_error_on_its_range(image_repo) -> None:
    repo, env, want = image_repo
    from diskvault.repository.pack import pack_key
    from diskvault.repository.repo import Repository
    from diskvault.storage.url import open_store

    rp = Repository.open(open_store(repo), lambda c: "secret")
    from diskvault.archive.view import ArchiveView

    item = ArchiveView.open(rp, "a").items[0]
    cid = [c for _, _, c in item.extents if c is not None][0]  # bytes 0 .. CHUNK-1
    loc = rp.index.get(cid)
    rp.close()
    pack = Path(repo) / pack_key(loc.pack)
    buf = bytearray(pack.read_bytes())
    buf[loc.offset + 40] ^= 1
    pack.write_bytes(bytes(buf))
    with serving("--port", "0", f"{repo}::a", env=env) as (uri, p):
        c = Client(uri)
        for off in (0, CHUNK - 1):
            c.send(0, off, 1)
            with pytest.raises(NbdError) as e:
                c.reply()
            assert e.value.errno == 5 and f"bytes 0-{CHUNK - 1} cannot be read" in e.value.msg
        assert c.pread(CHUNK, CHUNK) == want.read_bytes()[CHUNK : 2 * CHUNK]
        c.close()
        r = subprocess.run(["nbdcopy", uri, "null:"], capture_output=True, timeout=300)
        assert r.returncode != 0  # a copy of the whole export fails: no wrong bytes


def test_disk_archive_exports_every_item(tmp_path: Path) -> None:
    from archive.test_disk_images import gpt_disk

    disk = gpt_disk(tmp_path)
    repo = str(tmp_path / "repo")
    env = init_repo(repo, "none")
    dv("disk", "backup", f"{repo}::d", disk.path, env=env)
    want = dv("extract", "--stdout", f"{repo}::d", env=env).stdout
    items = dv("list", "--format", "{path}{NL}", f"{repo}::d", env=env).stdout.decode().split()
    sock = str(tmp_path / "nbd.sock")
    with serving("--socket", sock, f"{repo}::d", env=env) as (uri, _):
        assert uri == f"nbd+unix:///?socket={sock}"
        listing = run("nbdinfo", "--list", uri)
        for name in ["disk.img", *items]:
            assert f'export="{name}"' in listing
        out = tmp_path / "disk.out"
        run("nbdcopy", uri, str(out))  # the default export: the whole disk
        assert out.read_bytes() == want
        part = dv("extract", "--stdout", f"{repo}::d", "disk/part1", env=env).stdout
        run("nbdcopy", f"nbd+unix:///disk/part1?socket={sock}", str(out))
        assert out.read_bytes() == part
        holes = [line.split() for line in run("nbdinfo", "--map", uri).splitlines()]
        assert any(int(f) == 3 for _, _, f, *_ in holes)  # free blocks of the filesystems
    with serving("--socket", sock, f"{repo}::d", "disk/part2", env=env) as (uri, _):
        run("nbdcopy", uri, str(out))
        assert out.read_bytes() == dv("extract", "--stdout", f"{repo}::d", "disk/part2",
                                      env=env).stdout
    assert not os.path.exists(sock)  # removed on a clean stop


def test_bad_input_is_one_error_line(image_repo, tmp_path: Path) -> None:
    repo, env, _ = image_repo
    for args, msg in [
        ([f"{repo}::nope"], "archive 'nope' does not exist"),
        ([f"{repo}::a", "no/such"], "has no item 'no/such'"),
        ([str(tmp_path / "none") + "::a"], f"{tmp_path / 'none'}"),  # no repository there
        (["--port", "70000", f"{repo}::a"], "invalid port"),
    ]:
        r = dv("serve-nbd", *args, env=env, check=False, timeout=120)
        err = r.stderr.decode()
        assert r.returncode == 2 and r.stdout == b"", (args, err)
        assert err.count("\n") == 1 and msg in err, err
    with serving("--port", "0", f"{repo}::a", env=env) as (uri, _):
        port = uri.rsplit(":", 1)[1]
        r = dv("serve-nbd", "--port", port, f"{repo}::a", env=env, check=False, timeout=120)
        err = r.stderr.decode()
        assert r.returncode == 2 and err.count("\n") == 1 and "cannot listen" in err, err
    not_sock = tmp_path / "file"
    not_sock.write_text("x")
    r = dv("serve-nbd", "--socket", str(not_sock), f"{repo}::a", env=env, check=False)
    assert r.returncode == 2 and "is not a socket" in r.stderr.decode()
    assert not_sock.read_text() == "x"


def test_sigkill_leaves_nothing_behind(image_repo, tmp_path: Path) -> None:
    repo, env, want = image_repo
    sock = str(tmp_path / "s.sock")
    with serving("--socket", sock, f"{repo}::a", env=env) as (uri, p):
        c = Client(uri)
        assert c.pread(0, 4096) == want.read_bytes()[:4096]
        p.kill()
        p.wait(60)
        with pytest.raises((ConnectionError, OSError)):
            c.pread(0, 4096)  # the client sees the connection end, it does not hang
        c.f.close()
        c.s.close()
    # the socket path is reusable at once, and the shared lock of the dead server is
    # no obstacle to an exclusive operation
    with serving("--socket", sock, f"{repo}::a", env=env) as (uri, _):
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(want))
    deadline = time.monotonic() + 120
    dv("compact", repo, env=env, timeout=120)
    assert time.monotonic() < deadline
    assert not list((Path(repo) / "locks").iterdir())


def test_several_items_and_no_default(image_repo, tmp_path: Path) -> None:
    repo, env, _ = image_repo
    for n in ("x", "y"):
        (tmp_path / n).write_bytes(n.encode() * 5000)
    dv("create", f"{repo}::two", str(tmp_path / "x"), str(tmp_path / "y"), env=env)
    with serving("--port", "0", f"{repo}::two", env=env) as (uri, _):
        with pytest.raises(NbdError) as e:
            Client(uri)  # the empty name: no default export to choose
        assert e.value.errno == 6 and "no default export" in e.value.msg
        name = f"{str(tmp_path).strip('/')}/y"
        c = Client(uri, export=name)
        assert c.size == 5000 and c.pread(0, 5000) == b"y" * 5000
        c.close()
