#!/usr/bin/env python3
"""Benchmark: `diskvault disk backup` of a used disk vs Borg, Borg + zerofree, partclone.

The disk: a GPT image (default 4 GiB) with one ext4 partition, ~30 % used by files (half
random, half text), whose free space is full of stale random data — what a disk looks
like after heavy use. Everything reads the same loop device over the image (the seed's
`borg create --read-special $DISK`); partclone reads a loop device over the partition.

Measured: bytes read and stored, repository size, wall time. Targets: diskvault reads
at most the used bytes + 2 %; its repository is about the size of Borg's after zerofree
(without having to write zeros over the disk first). Not part of the test suite: needs
root, loop devices, ~12 GB of scratch space, and a few minutes. Timings on a shared
machine are noisy: run it twice before trusting a difference under ~20 %.

    sudo python bench/bench_disk.py [--size-gib 4] [--used 0.3] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

MiB = 1 << 20
PASSPHRASE = "bench"


def run(*cmd: str, env: dict | None = None, input: str | None = None) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, input=input)
    ok = (0, 1) if cmd[0] == "borg" else (0,)  # borg: 1 is a warning
    if r.returncode not in ok:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def timed(*cmd: str, env: dict | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    out = run(*cmd, env=env)
    return time.perf_counter() - t, out


@contextlib.contextmanager
def loop(image: str, offset: int = 0, size: int = 0, ro: bool = False) -> Iterator[str]:
    cmd = ["losetup", "-f", "--show"] + (["-o", str(offset)] if offset else []) \
        + (["--sizelimit", str(size)] if size else []) + (["-r"] if ro else [])
    dev = run(*cmd, image).strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def du(path: str) -> int:
    return int(run("du", "-sb", path).split()[0])


# --- the disk ---------------------------------------------------------------------------


def stale_fill(path: str, size: int, seed: int = 1) -> None:
    """Random bytes everywhere: the deleted data a used disk holds in its free space."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(rng.bytes(64 * MiB))
        f.truncate(size)


def write_files(root: Path, total: int, seed: int = 2) -> int:
    """Files of 1-64 MiB, half random and half text-like, until ``total`` bytes."""
    rng = np.random.default_rng(seed)
    words = [bytes(rng.choice(list(b"etaoinshrdlu "), rng.integers(2, 10)))
             for _ in range(5000)]
    text = b" ".join(words[int(i)] for i in rng.integers(0, len(words), 400_000))
    done, i = 0, 0
    while done < total:
        n = int(min(rng.integers(1 * MiB, 64 * MiB), total - done))
        half = n // 2
        body = rng.bytes(half) + (text * (1 + (n - half) // len(text)))[: n - half]
        (root / f"f{i:04d}.bin").write_bytes(body)
        done, i = done + n, i + 1
    return done


def build_disk(work: Path, size: int, used: float) -> tuple[str, int, int]:
    """The image, and its partition's (start, size)."""
    img = str(work / "disk.img")
    print(f"building a {size / (1 << 30):.1f} GiB disk ({used:.0%} used, stale free space)...")
    stale_fill(img, size)
    run("sfdisk", "-q", img, input="label: gpt\n,,L\n")
    part = json.loads(run("sfdisk", "--json", img))["partitiontable"]["partitions"][0]
    start, psize = part["start"] * 512, part["size"] * 512
    mnt = work / "mnt"
    mnt.mkdir()
    with loop(img, start, psize) as dev:
        run("mke2fs", "-q", "-F", "-t", "ext4", "-E", "nodiscard", dev)  # keep stale data
        run("mount", dev, str(mnt))
        try:
            write_files(mnt, int(used * size))
        finally:
            run("umount", str(mnt))
    return img, start, psize


def ext4_used(dev: str) -> int:
    info = {}
    for line in run("dumpe2fs", "-h", dev).splitlines():
        k, _, v = line.partition(":")
        info[k.strip()] = v.strip()
    return (int(info["Block count"]) - int(info["Free blocks"])) * int(info["Block size"])


# --- the tools ----------------------------------------------------------------------


def bench_diskvault(work: Path, disk_dev: str) -> dict:
    env = {**os.environ, "DISKVAULT_PASSPHRASE": PASSPHRASE}
    repo = str(work / "dv-repo")
    run(sys.executable, "-m", "diskvault", "init", "-e", "repokey", repo, env=env)
    secs, out = timed(sys.executable, "-m", "diskvault", "disk", "backup", "--json",
                      f"{repo}::disk", disk_dev, env=env)
    s = json.loads(out)["archive"]["stats"]
    return {"read": s["read"], "stored": s["new_stored"], "repo": du(repo), "seconds": secs}


def bench_borg(work: Path, disk_dev: str, name: str) -> dict:
    env = {**os.environ, "BORG_PASSPHRASE": PASSPHRASE, "BORG_BASE_DIR": str(work / "borg"),
           "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes"}
    repo = str(work / name)
    run("borg", "init", "-e", "repokey-blake2", repo, env=env)
    secs, _ = timed("borg", "create", "--read-special", "--chunker-params", "fixed,4194304",
                    "-C", "lz4", f"{repo}::disk", disk_dev, env=env)
    info = json.loads(run("borg", "info", "--json", f"{repo}::disk", env=env))
    s = info["archives"][0]["stats"]
    return {"read": s["original_size"], "stored": s["deduplicated_size"], "repo": du(repo),
            "seconds": secs}


def bench_partclone(work: Path, part_dev: str) -> dict:
    out = str(work / "part.pcl")
    secs, _ = timed("partclone.ext4", "-q", "-c", "-s", part_dev, "-O", out)
    size = os.path.getsize(out)
    os.unlink(out)
    return {"read": None, "stored": size, "repo": size, "seconds": secs}


# --- report ---------------------------------------------------------------------------


def fmt(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.0f} MB"


def table(rows: dict[str, dict], used: int) -> str:
    base = rows["diskvault disk backup"]
    head = (f"{'':34}{'read':>11}{'stored':>11}{'repo size':>11}{'time':>9}"
            f"{'time ×':>8}{'repo ×':>8}")
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:34}{fmt(r['read']):>11}{fmt(r['stored']):>11}"
                     f"{fmt(r['repo']):>11}{r['seconds']:>8.1f}s"
                     f"{r['seconds'] / base['seconds']:>8.2f}{r['repo'] / base['repo']:>8.2f}")
    lines.append(f"{'used bytes (dumpe2fs + table/gaps)':34}{fmt(used):>11}")
    lines.append(f"diskvault read / used = {base['read'] / used:.4f} (target ≤ 1.02)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=4.0)
    ap.add_argument("--used", type=float, default=0.3)
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (loop devices, mount)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dv-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        img, start, psize = build_disk(work, int(args.size_gib * (1 << 30)) // MiB * MiB,
                                       args.used)
        run("sync")
        rows: dict[str, dict] = {}
        with loop(img, ro=True) as disk, loop(img, start, psize, ro=True) as part:
            used = ext4_used(part) + (os.path.getsize(img) - psize)
            # every tool then reads from the page cache: the comparison is of the tools
            subprocess.run(["cat", disk], stdout=subprocess.DEVNULL, check=True)
            print("diskvault disk backup...")
            rows["diskvault disk backup"] = bench_diskvault(work, disk)
            print("borg create --read-special...")
            rows["borg create --read-special"] = bench_borg(work, disk, "borg-repo")
            print("partclone.ext4 -c...")
            rows["partclone.ext4 -c (image file)"] = bench_partclone(work, part)
        print("zerofree, then borg again...")
        with loop(img, start, psize) as part:
            zsecs, _ = timed("zerofree", part)
        with loop(img, ro=True) as disk:
            r = bench_borg(work, disk, "borg-zerofree-repo")
            r["seconds"] += zsecs
            rows[f"zerofree ({zsecs:.0f}s) + borg create"] = r
        print()
        print(table(rows, used))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
