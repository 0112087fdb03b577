#!/usr/bin/env python3
"""Block-level incrementals: second-backup growth vs changed bytes, diskvault vs Borg vs
restic on the same data in one run; restore speed and CPU of diskvault's deltas.

Scenarios (seeded):
  scattered  a VM-like image (80 % random data, 20 % zeros) with 2 % of its used 4 KiB
             blocks rewritten at scattered offsets;
  clustered  the same 2 % in runs of 4 KiB – 1 MiB;
  ext4       (--ext4, needs root + loop) an ext4 image filled from /usr, then package-like
             churn through a loop mount: files replaced, logs appended, a tree unpacked.

For each: first backup, second backup; growth of the repository (du) against the
changed bytes (4 KiB blocks that differ at the same offset). diskvault also runs a plain
second backup (`--no-parent`) for CPU and restore comparison, and a second backup with
`--changed-extents` (the exact changed blocks) for bytes read.

    python3 bench/bench_delta.py [--size-mib 512] [--work DIR] [--tools diskvault,borg,restic]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import DV, du, run, warm  # noqa: E402

MiB = 1 << 20
BLOCK = 4096


def make_pair(work: str, size: int, clustered: bool, seed: int) -> tuple[str, str, int]:
    rng = random.Random(seed)
    used = size * 4 // 5
    img1, img2 = os.path.join(work, "one.img"), os.path.join(work, "two.img")
    with open(img1, "wb") as f:
        for _ in range(used // (16 * MiB)):
            f.write(rng.randbytes(16 * MiB))
        f.truncate(size)
    shutil.copyfile(img1, img2)
    target = used // BLOCK // 50
    with open(img2, "r+b") as f:
        if clustered:
            done = 0
            while done < target:
                n = min(rng.randint(1, 256), target - done)
                f.seek(rng.randrange(0, used // BLOCK - n) * BLOCK)
                f.write(rng.randbytes(n * BLOCK))
                done += n
        else:
            for b in rng.sample(range(used // BLOCK), target):
                f.seek(b * BLOCK)
                f.write(rng.randbytes(BLOCK))
    return img1, img2, size


def make_ext4(work: str, size: int) -> tuple[str, str, int]:
    src = os.path.join(work, "tree")
    shutil.rmtree(src, ignore_errors=True)
    os.makedirs(src)
    budget = size * 2 // 5
    for d in ("/usr/share", "/usr/lib"):  # real OS files, as a root filesystem holds
        for root, _, files in os.walk(d):
            for name in files:
                p = os.path.join(root, name)
                if not os.path.isfile(p) or os.path.islink(p):
                    continue
                n = os.path.getsize(p)
                if n > budget:
                    continue
                dst = os.path.join(src, os.path.relpath(p, "/"))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copyfile(p, dst)
                budget -= n
            if budget < 1 * MiB:
                break
    img1, img2 = os.path.join(work, "one.img"), os.path.join(work, "two.img")
    for p in (img1, img2):
        if os.path.exists(p):
            os.unlink(p)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-N", "200000", "-d", src, img1,
                    f"{size // 1024}k"], check=True)
    shutil.copyfile(img1, img2)
    mnt = tempfile.mkdtemp(dir=work)
    subprocess.run(["mount", "-o", "loop", img2, mnt], check=True)
    try:
        rng = random.Random(5)
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(mnt) for f in fs)
        for p in rng.sample(files, len(files) // 50):  # package upgrade: files replaced
            n = os.path.getsize(p)
            os.unlink(p)
            with open(p, "wb") as f:
                f.write(rng.randbytes(n))
        os.makedirs(os.path.join(mnt, "var/log"), exist_ok=True)
        with open(os.path.join(mnt, "var/log/syslog"), "ab") as f:  # logs growing
            for i in range(20000):
                f.write(f"Nov 29 12:{i % 60:02d}:00 host daemon[{i}]: message {i}\n".encode())
        new = os.path.join(mnt, "usr/lib/newpkg")  # a package unpacked
        os.makedirs(new, exist_ok=True)
        for i in range(200):
            with open(os.path.join(new, f"f{i}"), "wb") as f:
                f.write(rng.randbytes(rng.randint(1000, 60000)))
    finally:
        subprocess.run(["umount", mnt], check=True)
        os.rmdir(mnt)
    return img1, img2, size


def changed_blocks(img1: str, img2: str) -> list[int]:
    out = []
    with open(img1, "rb") as a, open(img2, "rb") as b:
        base = 0
        while True:
            x, y = a.read(16 * MiB), b.read(16 * MiB)
            if not x:
                break
            xa = np.frombuffer(x, np.uint8).reshape(-1, BLOCK)
            ya = np.frombuffer(y, np.uint8).reshape(-1, BLOCK)
            out += (base + np.flatnonzero((xa != ya).any(axis=1))).tolist()
            base += len(xa)
    return out


def place(work: str, img: str) -> str:
    """Every backup reads the same path (parents and items are matched by path), like a
    VM's disk image backed up night after night."""
    dst = os.path.join(work, "disk.img")
    shutil.copyfile(img, dst)
    warm(dst)
    return dst


def dv_env(work: str) -> dict:
    return {"DISKVAULT_PASSPHRASE": "bench", "DISKVAULT_CACHE_DIR": os.path.join(work, "dvc")}


def bench_diskvault(work: str, img1: str, img2: str, size: int, blocks: list[int]) -> dict:
    env = dv_env(work)
    res = {}
    for mode in ("delta", "plain", "extents"):
        repo = os.path.join(work, f"dv-{mode}")
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(env["DISKVAULT_CACHE_DIR"], ignore_errors=True)
        subprocess.run([*DV, "init", "-e", "repokey", repo], env={**os.environ, **env},
                       check=True, capture_output=True)
        first = run([*DV, "create", f"{repo}::one", place(work, img1)], env)
        size1 = du(repo)
        extra = {"plain": ["--no-parent"], "delta": [], "extents": []}[mode]
        if mode == "extents":
            lst = os.path.join(work, "changed.json")
            with open(lst, "w") as f:
                json.dump({"size": size, "parent": "one",
                           "extents": [[b * BLOCK, BLOCK] for b in blocks]}, f)
            extra = ["--parent", "one", "--changed-extents", lst]
        out = os.path.join(work, "second.json")
        src = place(work, img2)
        with open(out, "wb") as f:
            second = run([*DV, "create", "--json", *extra, f"{repo}::two", src], env,
                         stdout=f)
        with open(out) as f:
            stats = json.load(f)["archive"]["stats"]
        res[mode] = {"first": first, "second": second, "repo1": size1,
                     "repo2": du(repo), "read": stats["read"]}
    # restore speed on a busy machine: alternate the archives, keep each one's best run
    for mode in ("delta", "plain", "extents") * 3:
        ext = run([*DV, "extract", "--stdout", f"{os.path.join(work, 'dv-' + mode)}::two"],
                  env)
        best = res[mode].get("extract")
        if best is None or ext["wall"] < best["wall"]:
            res[mode]["extract"] = ext
    for mode in res:
        shutil.rmtree(os.path.join(work, f"dv-{mode}"))
    return res


def bench_borg(work: str, img1: str, img2: str) -> dict:
    repo = os.path.join(work, "borg")
    env = {"BORG_PASSPHRASE": "bench", "BORG_BASE_DIR": os.path.join(work, "borgbase")}
    shutil.rmtree(repo, ignore_errors=True)
    subprocess.run(["borg", "init", "-e", "repokey-blake2", repo], env={**os.environ, **env},
                   check=True, capture_output=True)
    res = {}
    for tag, cp in (("4M", "fixed,4194304"), ("default", None)):
        shutil.rmtree(repo, ignore_errors=True)
        subprocess.run(["borg", "init", "-e", "repokey-blake2", repo],
                       env={**os.environ, **env}, check=True, capture_output=True)
        common = ["--read-special", "-C", "lz4"] + (["--chunker-params", cp] if cp else [])
        a = run(["borg", "create", *common, f"{repo}::one", place(work, img1)], env)
        s1 = du(repo)
        b = run(["borg", "create", *common, f"{repo}::two", place(work, img2)], env)
        res[tag] = {"first": a, "second": b, "repo1": s1, "repo2": du(repo)}
    shutil.rmtree(repo)
    return res


def bench_restic(work: str, img1: str, img2: str) -> dict:
    repo = os.path.join(work, "restic")
    env = {"RESTIC_PASSWORD": "bench", "RESTIC_REPOSITORY": repo,
           "RESTIC_CACHE_DIR": os.path.join(work, "restic-cache")}
    shutil.rmtree(repo, ignore_errors=True)
    subprocess.run(["restic", "init", "-q"], env={**os.environ, **env}, check=True,
                   capture_output=True)
    a = run(f"restic backup -q --stdin --stdin-filename disk.img < {place(work, img1)}", env)
    s1 = du(repo)
    b = run(f"restic backup -q --stdin --stdin-filename disk.img < {place(work, img2)}", env)
    res = {"first": a, "second": b, "repo1": s1, "repo2": du(repo)}
    shutil.rmtree(repo)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--work", default=None)
    ap.add_argument("--tools", default="diskvault,borg,restic")
    ap.add_argument("--scenarios", default="scattered,clustered")
    ap.add_argument("--ext4", action="store_true", help="add the ext4 churn scenario")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="bench-delta-")
    os.makedirs(work, exist_ok=True)
    tools = args.tools.split(",")
    size = args.size_mib * MiB
    scen = args.scenarios.split(",") + (["ext4"] if args.ext4 else [])
    print(f"{'scenario':<10} {'changed MB':>10}  {'tool':<26} {'2nd stored MB':>13} "
          f"{'x changed':>9} {'2nd cpu s':>9} {'2nd rss MiB':>11}", flush=True)
    for name in scen:
        print(f"{name}: making images ...", file=sys.stderr)
        if name == "ext4":
            img1, img2, sz = make_ext4(work, size)
        else:
            img1, img2, sz = make_pair(work, size, name == "clustered", seed=1)
        blocks = changed_blocks(img1, img2)
        changed = len(blocks) * BLOCK
        r: dict = {"scenario": name, "size": sz, "changed": changed}
        if "diskvault" in tools:
            print(f"{name}: diskvault ...", file=sys.stderr)
            r["diskvault"] = bench_diskvault(work, img1, img2, sz, blocks)
        if "borg" in tools:
            print(f"{name}: borg ...", file=sys.stderr)
            r["borg"] = bench_borg(work, img1, img2)
        if "restic" in tools:
            print(f"{name}: restic ...", file=sys.stderr)
            r["restic"] = bench_restic(work, img1, img2)
        for p in (img1, img2, os.path.join(work, "disk.img")):
            os.unlink(p)
        print(json.dumps(r), file=sys.stderr)
        report(r)


def report(r: dict) -> None:
    mb = 1e6
    ch = r["changed"]
    lines = []
    for mode, d in r.get("diskvault", {}).items():
        lines.append((f"diskvault {mode}", d))
    for tag, d in r.get("borg", {}).items():
        lines.append((f"borg chunker {tag}", d))
    if "restic" in r:
        lines.append(("restic", r["restic"]))
    for label, d in lines:
        grown = d["repo2"] - d["repo1"]
        print(f"{r['scenario']:<10} {ch / mb:>10.1f}  {label:<26} {grown / mb:>13.1f} "
              f"{grown / ch:>9.2f} {d['second']['cpu']:>9.2f} {d['second']['rss']:>11.0f}")
    dvr = r.get("diskvault")
    if dvr:
        d, p, e = dvr["delta"], dvr["plain"], dvr["extents"]
        cpu = d["second"]["cpu"] / p["second"]["cpu"]
        print(f"  diskvault: 2nd-backup CPU delta/plain {cpu:.2f}"
              f"; restore speed delta/full {p['extract']['wall'] / d['extract']['wall']:.2f}"
              f" (delta {r['size'] / d['extract']['wall'] / mb:.0f} MB/s, full "
              f"{r['size'] / p['extract']['wall'] / mb:.0f} MB/s); --changed-extents read "
              f"{e['read'] / mb:.1f} MB of {r['size'] / mb:.0f} MB in "
              f"{e['second']['wall']:.1f} s (full read {d['second']['wall']:.1f} s)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
