#!/usr/bin/env python3
"""The view and serve-nbd: reading an archive in place vs restoring it.

On a VM-like image (bench_core.make_vm: 40 % random, 20 % text, 40 % zeros/holes):

- sequential read: ``extract --stdout`` vs the NBD export read by ``nbdcopy`` (hole-aware:
  block status skips zero runs), by ``nbdcopy --no-extents`` (every byte over the wire)
  and by one plain client reading 1 MiB requests in order;
- 4 KiB random reads at queue depth 1 and 16 (a small pipelining client), cold (fresh
  server: each read of a data chunk fetches and decompresses it) and warm (the same
  offsets again, from the cache);
- the server's peak RSS (VmHWM) with its default 256 MiB cache.

    python3 bench/bench_view.py [--size-gib 2] [--repo-dir /dev/shm/dvv] [-e repokey]
"""

from __future__ import annotations

import argparse
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from bench_core import make_vm  # noqa: E402
from serve.nbd_client import Client  # noqa: E402

MiB = 1 << 20
DV = [sys.executable, "-m", "diskvault"]
ENV = {**os.environ, "DISKVAULT_PASSPHRASE": "bench"}
FIRST_URI_S = 0.0  # from starting serve-nbd to its URI (the export is ready)


def timed(cmd: list[str], stdout=subprocess.DEVNULL) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=ENV, stdout=stdout, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def serve(loc: str) -> tuple[subprocess.Popen, str]:
    global FIRST_URI_S
    t0 = time.perf_counter()
    p = subprocess.Popen([*DV, "serve-nbd", "--port", "0", loc], env=ENV,
                         stdout=subprocess.PIPE)
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], 300)
    if not ready:
        raise SystemExit("serve-nbd printed no URI")
    uri = p.stdout.readline().decode().strip()
    FIRST_URI_S = FIRST_URI_S or time.perf_counter() - t0
    return p, uri


def stop(p: subprocess.Popen) -> int:
    """Stop the server; return its peak RSS in MiB."""
    with open(f"/proc/{p.pid}/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    p.terminate()
    p.wait(60)
    return hwm // 1024


def seq_client(uri: str, size: int) -> float:
    c = Client(uri)
    t0 = time.perf_counter()
    depth, step, off, pending = 4, MiB, 0, {}
    while off < size or pending:
        while off < size and len(pending) < depth:
            n = min(step, size - off)
            pending[c.send(0, off, n)] = (off, n)
            off += n
        cookie, _ = c.reply(pending)
        del pending[cookie]
    dt = time.perf_counter() - t0
    c.close()
    return dt


def random_reads(uri: str, offsets: list[int], depth: int) -> float:
    """IOPS of 4 KiB reads at the given offsets with ``depth`` requests in flight."""
    c = Client(uri)
    t0 = time.perf_counter()
    pending: dict[int, tuple[int, int]] = {}
    it = iter(offsets)
    done = 0
    while done < len(offsets):
        while len(pending) < depth:
            off = next(it, None)
            if off is None:
                break
            pending[c.send(0, off, 4096)] = (off, 4096)
        cookie, _ = c.reply(pending)
        del pending[cookie]
        done += 1
    dt = time.perf_counter() - t0
    c.close()
    return len(offsets) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=2)
    ap.add_argument("--repo-dir", default=None, help="where the repository lives (tmpfs: CPU)")
    ap.add_argument("-e", "--encryption", default="repokey")
    ap.add_argument("--ops", type=int, default=3000, help="random reads per measurement")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="dvview-")
    repo_parent = a.repo_dir or work
    os.makedirs(repo_parent, exist_ok=True)
    repo = os.path.join(repo_parent, "repo")
    shutil.rmtree(repo, ignore_errors=True)
    ENV["DISKVAULT_CACHE_DIR"] = os.path.join(work, "cache")
    size = int(a.size_gib * 1024) * MiB
    img = os.path.join(work, "vm.img")
    try:
        make_vm(img, size)
        subprocess.run([*DV, "init", "-e", a.encryption, repo], check=True, env=ENV)
        subprocess.run([*DV, "create", f"{repo}::a", img], check=True, env=ENV)
        os.unlink(img)
        loc = f"{repo}::a"
        rows = []
        t = timed([*DV, "extract", "--stdout", loc])
        base = size / t / 1e6
        rows.append(("extract --stdout > /dev/null", base))
        rss_seq = 0
        # a fresh server (cold cache) for each reader
        for name, fn in [
            ("nbdcopy (block status: skips holes)",
             lambda uri: timed(["nbdcopy", uri, "null:"])),
            ("nbdcopy --no-extents (every byte)",
             lambda uri: timed(["nbdcopy", "--no-extents", uri, "null:"])),
            ("one client, 1 MiB reads, 4 in flight", lambda uri: seq_client(uri, size)),
        ]:
            p, uri = serve(loc)
            rows.append((name, size / fn(uri) / 1e6))
            rss_seq = max(rss_seq, stop(p))
        print(f"\nsequential read of a {size / 2**30:.1f} GiB VM-like image "
              f"({a.encryption}; MB/s of image size)")
        for name, mbs in rows:
            print(f"  {name:42s} {mbs:8.0f}  {100 * mbs / base:5.0f} % of extract")
        rnd = random.Random(1)
        offsets = [rnd.randrange(size // 4096) * 4096 for _ in range(a.ops)]
        # warm: a working set that fits the cache (128 MiB), read once before
        hot = min(size, 128 * MiB)
        hot_offsets = [rnd.randrange(hot // 4096) * 4096 for _ in range(a.ops)]
        print(f"\n4 KiB random reads ({a.ops} per run, IOPS; cold: over the whole image, "
              f"fresh server; warm: within {hot // MiB} MiB already read)")
        for depth in (1, 16):
            p, uri = serve(loc)
            cold = random_reads(uri, offsets, depth)
            seq_client(uri, hot)
            warm = random_reads(uri, hot_offsets, depth)
            rss = stop(p)
            print(f"  QD{depth:<3d} cold {cold:9.0f}   warm {warm:9.0f}   server peak RSS "
                  f"{rss} MiB")
        print(f"\nserver peak RSS after the sequential runs: {rss_seq} MiB (cache 256 MiB)")
        t0 = time.perf_counter()
        p, uri = serve(loc)
        c = Client(uri)
        c.pread(size // 2, 4096)
        first = time.perf_counter() - t0
        c.close()
        stop(p)
        print(f"time to the first byte (start serve-nbd, connect, read 4 KiB): {first:.2f} s "
              f"(export ready after {FIRST_URI_S:.2f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if a.repo_dir:
            shutil.rmtree(repo, ignore_errors=True)


if __name__ == "__main__":
    main()
