#!/usr/bin/env python3
"""Core benchmark: diskvault vs Borg vs restic on the same images, in the same run.

Images:
  vm      a VM-disk-like image: 40 % random, 20 % text-like, 40 % zeros/holes;
          vm2 = the same with ~3 % of its 4 KiB blocks rewritten (scattered writes)
          plus a few MiB appended-style changes.
  rootfs  an ext4 image of this machine's own Debian root (/usr, /etc: real OS files,
          `mke2fs -d`), and a modified copy (a few hundred files changed/added).

For each tool and configuration: first backup, second backup (of the modified image,
under the same path as the first, as a nightly backup sees it), `extract --stdout` of the
second — wall time, CPU time, peak RSS, repository size (and what the second added).

    python3 bench/bench_core.py [--size-gib 4] [--work DIR] [--skip-restic] [--only vm]
                                [--repeat 3]

Prints a table and ratios diskvault/borg with the same compression and encryption.
``--repeat N`` runs every configuration N times, in rounds (each round runs every tool
once, so a slow spell of the host falls on all of them), and reports the median of each
time; on a shared or nested-virtualised host one run varies by ±10 %.

``--hold-freed-memory`` (root, in a VM whose balloon has free page reporting): a guest
that reports its free memory to the host pays the host's page faults again when it
next uses that memory — here writing 2.4 GiB into fresh tmpfs pages took 3.6 s of
system time against 0.9 s into pages used once before, whichever tool wrote them. The
flag stops the reporting for the run (``page_reporting_order`` above the largest page
order; restored at the end) and touches the free memory once, so every tool writes into
memory as on a machine without a balloon.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

MiB = 1 << 20
# run diskvault as the Python module: a version manager's shim script (pyenv) would add
# ~0.2 s of shell per command that Borg's and restic's binaries don't pay
DV = [sys.executable, "-m", "diskvault"]
REPO_DIR: str | None = None  # --repo-dir: e.g. a tmpfs, to measure CPU rather than the disk


def run(cmd: list[str] | str, env: dict | None = None, stdin=None, stdout=None) -> dict:
    """Run a command under /usr/bin/time; return wall, cpu, peak RSS (MiB)."""
    e = dict(os.environ)
    # an installed diskvault runs from compiled bytecode (as Debian's Borg does); a
    # test environment that forbids writing it would add compiling to every command
    e.pop("PYTHONDONTWRITEBYTECODE", None)
    if env:
        e.update(env)
    fd, tfile = tempfile.mkstemp()
    os.close(fd)
    shell = isinstance(cmd, str)
    full = (f"/usr/bin/time -o {tfile} -f '%e %U %S %M' {cmd}" if shell
            else ["/usr/bin/time", "-o", tfile, "-f", "%e %U %S %M", *cmd])
    t0 = time.perf_counter()
    r = subprocess.run(full, env=e, stdin=stdin, stdout=stdout or subprocess.DEVNULL,
                       stderr=subprocess.PIPE, shell=shell)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed: {cmd}\n{r.stderr.decode()[-2000:]}")
    with open(tfile) as f:
        parts = f.read().split()[-4:]
    os.unlink(tfile)
    _, user, sys_, rss = (float(x) for x in parts)
    return {"wall": wall, "cpu": user + sys_, "rss": rss / 1024}


def du(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(d, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def warm(path: str) -> None:
    """Read an image into the page cache, so every tool starts from the same state.

    First (as root) drop the clean page cache: with memory full of cache from earlier
    runs, every page a tool writes into a tmpfs repository is found by direct reclaim
    in that tool's own system time, which varied a run's CPU-seconds by up to 2x."""
    if os.geteuid() == 0:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as dc:
            dc.write("1\n")
    with open(path, "rb") as f:
        while f.read(16 * MiB):
            pass


# --- images -------------------------------------------------------------------------

def make_vm(path: str, size: int, seed: int = 7) -> None:
    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 10)))
             for _ in range(20000)]
    text = b" ".join(rnd.choice(words) for _ in range(2_000_000))
    with open(path, "wb") as f:
        blk = 4 * MiB
        for _ in range(size // blk):
            r = rnd.random()
            if r < 0.40:
                f.write(os.urandom(blk))
            elif r < 0.60:
                off = rnd.randrange(0, len(text) - blk)
                f.write(text[off : off + blk])
            elif r < 0.80:
                f.write(bytes(blk))
            else:
                f.seek(blk, 1)
        f.truncate(size)


def sparse_copy(src: str, dst: str) -> None:
    # VM images are sparse files; a plain copy would turn their holes into zeros
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)


def modify_vm(src: str, dst: str, frac: float = 0.03, seed: int = 8) -> None:
    sparse_copy(src, dst)
    rnd = random.Random(seed)
    size = os.path.getsize(dst)
    nblocks = size // 4096
    with open(dst, "r+b") as f:
        for _ in range(int(nblocks * frac)):
            f.seek(rnd.randrange(nblocks) * 4096)
            f.write(os.urandom(4096))
        for _ in range(4):  # a few MiB of contiguous change
            f.seek(rnd.randrange(size // MiB - 2) * MiB)
            f.write(os.urandom(MiB))


def make_rootfs(work: str) -> tuple[str, str]:
    tree = os.path.join(work, "root")
    os.makedirs(tree, exist_ok=True)
    # a Debian root's typical content, about 1.7 GB: binaries, libraries, docs, config
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/share", "/usr/bin", "/etc"):
        subprocess.run(["cp", "-a", "--parents", d, tree], check=False,
                       stderr=subprocess.DEVNULL)
    img1 = os.path.join(work, "rootfs.img")
    used = du(tree)
    size = max(512 * MiB, int(used * 1.6) // MiB * MiB)
    with open(img1, "wb") as f:
        f.truncate(size)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, img1], check=True)
    # modified copy: change and add files in the image without mounting (debugfs)
    img2 = os.path.join(work, "rootfs2.img")
    sparse_copy(img1, img2)
    cmds = []
    newdir = os.path.join(work, "new")
    os.makedirs(newdir, exist_ok=True)
    for i in range(200):
        p = os.path.join(newdir, f"new{i}")
        with open(p, "wb") as f:
            f.write(os.urandom(20000) + b"config line\n" * 500)
        cmds.append(f"write {p} /etc/new{i}")
    with open(os.path.join(work, "debugfs.cmds"), "w") as f:
        f.write("\n".join(cmds) + "\n")
    subprocess.run(["debugfs", "-w", "-f", os.path.join(work, "debugfs.cmds"), img2],
                   check=True, capture_output=True)
    shutil.rmtree(tree)
    shutil.rmtree(newdir)
    return img1, img2


# --- tools --------------------------------------------------------------------------

@contextlib.contextmanager
def as_disk(img: str) -> Iterator[str]:
    """The image under one fixed name, ``disk.img`` beside it, for the time of a backup.

    Users back up the same disk or image path night after night, and diskvault takes the
    previous archive's item of the same path as the parent for block-level deltas; with
    vm.img then vm2.img it saw two unrelated files and stored the second whole. A rename,
    not a copy: nothing is written, and the page cache stays warm."""
    disk = os.path.join(os.path.dirname(img), "disk.img")
    os.rename(img, disk)
    try:
        yield disk
    finally:
        os.rename(disk, img)


def bench_diskvault(work, img1, img2, comp, enc):
    repo = os.path.join(REPO_DIR or work, f"dv-{comp}-{enc}")
    env = {"DISKVAULT_PASSPHRASE": "bench"}
    shutil.rmtree(repo, ignore_errors=True)
    subprocess.run([*DV, "init", "-e", enc, repo], env={**os.environ, **env}, check=True)
    with as_disk(img1) as disk:
        warm(disk)
        a = run([*DV, "create", "-C", comp, f"{repo}::one", disk], env)
    size1 = du(repo)
    with as_disk(img2) as disk:
        warm(disk)
        b = run([*DV, "create", "-C", comp, f"{repo}::two", disk], env)
    c = run([*DV, "extract", "--stdout", f"{repo}::two"], env)
    res = {"first": a, "second": b, "extract": c, "repo1": size1, "repo2": du(repo)}
    shutil.rmtree(repo)
    return res


def bench_borg(work, img1, img2, comp, enc):
    repo = os.path.join(REPO_DIR or work, f"borg-{comp}-{enc}")
    env = {"BORG_PASSPHRASE": "bench", "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
           "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}
    shutil.rmtree(repo, ignore_errors=True)
    subprocess.run(["borg", "init", "-e", enc, repo], env={**os.environ, **env}, check=True)
    common = ["--read-special", "--chunker-params", "fixed,4194304", "-C", comp]
    with as_disk(img1) as disk:
        warm(disk)
        a = run(["borg", "create", *common, f"{repo}::one", disk], env)
    size1 = du(repo)
    with as_disk(img2) as disk:
        warm(disk)
        b = run(["borg", "create", *common, f"{repo}::two", disk], env)
    c = run(["borg", "extract", "--stdout", f"{repo}::two"], env)
    res = {"first": a, "second": b, "extract": c, "repo1": size1, "repo2": du(repo)}
    shutil.rmtree(repo)
    return res


def bench_restic(work, img1, img2):
    repo = os.path.join(REPO_DIR or work, "restic")
    env = {"RESTIC_PASSWORD": "bench", "RESTIC_REPOSITORY": repo,
           "RESTIC_CACHE_DIR": os.path.join(work, "restic-cache")}
    shutil.rmtree(repo, ignore_errors=True)
    subprocess.run(["restic", "init", "-q"], env={**os.environ, **env}, check=True)
    warm(img1)
    a = run(f"restic backup -q --stdin --stdin-filename disk.img < {img1}", env)
    size1 = du(repo)
    warm(img2)
    b = run(f"restic backup -q --stdin --stdin-filename disk.img < {img2}", env)
    c = run("restic dump -q latest disk.img", env)
    res = {"first": a, "second": b, "extract": c, "repo1": size1, "repo2": du(repo)}
    shutil.rmtree(repo)
    return res


REPORTING_ORDER = "/sys/module/page_reporting/parameters/page_reporting_order"


@contextlib.contextmanager
def freed_memory_held() -> Iterator[None]:
    """Free page reporting off for the run, and the free memory touched once (see the
    module docstring); the old setting comes back at the end."""
    with open(REPORTING_ORDER) as f:
        old = f.read().strip()
    with open(REPORTING_ORDER, "w") as f:
        f.write("11\n")  # above MAX_PAGE_ORDER (10): no free block is large enough
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f
                         if line.startswith("MemAvailable:"))
        # into tmpfs, whatever --repo-dir is: on a disk the file would be written out,
        # not held in memory (and ~19 GB of it)
        fill = "/dev/shm/diskvault-bench-touch"
        block, touch = b"\1" * (16 * MiB), max(0, avail - 3 * 1024 * MiB)  # 3 GiB spare
        print(f"touching {touch // MiB} MiB of free memory once ...", file=sys.stderr)
        with open(fill, "wb") as f:
            for _ in range(touch // len(block)):
                f.write(block)
        os.unlink(fill)
        yield
    finally:
        with open(REPORTING_ORDER, "w") as f:
            f.write(old + "\n")


def median_of(runs: list[dict]) -> dict:
    """One result from repeated runs of a configuration: the median of each time, the
    largest RSS; the sizes are the same in every run."""
    out = dict(runs[-1])
    for phase in ("first", "second", "extract"):
        out[phase] = {"wall": statistics.median(r[phase]["wall"] for r in runs),
                      "cpu": statistics.median(r[phase]["cpu"] for r in runs),
                      "rss": max(r[phase]["rss"] for r in runs)}
    return out


def report(name: str, size: int, results: dict) -> None:
    print(f"\n=== {name}: {size / MiB:.0f} MiB image ===")
    hdr = (f"{'tool/config':34} {'1st MB/s':>9} {'2nd MB/s':>9} {'extr MB/s':>9} "
           f"{'1st cpu s':>9} {'cpu s/GiB':>9} {'RSS MiB':>8} {'repo1 MiB':>9} {'+repo2 MiB':>10}")
    print(hdr)
    for key, r in results.items():
        mbs = lambda x: size / MiB / x["wall"]  # noqa: E731
        print(f"{key:34} {mbs(r['first']):9.0f} {mbs(r['second']):9.0f} "
              f"{mbs(r['extract']):9.0f} {r['first']['cpu']:9.1f} "
              f"{r['first']['cpu'] / (size / (1 << 30)):9.2f} "
              f"{max(r['first']['rss'], r['second']['rss'], r['extract']['rss']):8.0f} "
              f"{r['repo1'] / MiB:9.1f} {(r['repo2'] - r['repo1']) / MiB:10.1f}")
    print("ratios diskvault / borg (same compression+encryption; >1 = diskvault faster/smaller "
          "for speed, <1 = smaller for size):")
    for key, r in results.items():
        if not key.startswith("diskvault"):
            continue
        bkey = (key.replace("diskvault", "borg").replace("repokey", "repokey-blake2")
                .replace("auto,", ""))
        if bkey not in results:
            continue
        b = results[bkey]
        print(f"  {key:32} create x{b['first']['wall'] / r['first']['wall']:.2f}  "
              f"2nd x{b['second']['wall'] / r['second']['wall']:.2f}  "
              f"extract x{b['extract']['wall'] / r['extract']['wall']:.2f}  "
              f"cpu 1st {r['first']['cpu'] / b['first']['cpu']:.2f}  "
              f"repo {r['repo2'] / b['repo2']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=4.0)
    ap.add_argument("--work", default="/var/tmp/diskvault-bench")
    ap.add_argument("--skip-restic", action="store_true")
    ap.add_argument("--only", choices=["vm", "rootfs"])
    ap.add_argument("--repo-dir", help="put repositories here (default: --work)")
    ap.add_argument("--tools", default="diskvault,borg,restic")
    ap.add_argument("--comp", default="lz4,zstd,3",
                    help="compressions, ';'-separated (diskvault and Borg get the same)")
    ap.add_argument("--enc", default="none,repokey", help="encryption modes to run")
    ap.add_argument("--dv-comp", default="",
                    help="';'-separated extra diskvault-only compressions (e.g. auto,lz4)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every configuration this many times, report medians")
    ap.add_argument("--hold-freed-memory", action="store_true",
                    help="root in a VM: stop free page reporting for the run (see above)")
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        if args.hold_freed_memory:
            if not os.path.exists(REPORTING_ORDER) or os.geteuid() != 0:
                raise SystemExit("--hold-freed-memory: needs root and a kernel with free "
                                 "page reporting (" + REPORTING_ORDER + ")")
            stack.enter_context(freed_memory_held())
        bench(args)


def bench(args: argparse.Namespace) -> None:
    global REPO_DIR
    REPO_DIR = args.repo_dir
    tools = set(args.tools.split(","))
    os.makedirs(args.work, exist_ok=True)
    sets = []
    if args.only in (None, "vm"):
        vm1, vm2 = os.path.join(args.work, "vm.img"), os.path.join(args.work, "vm2.img")
        size = int(args.size_gib * 1024) * MiB
        if not os.path.exists(vm1) or os.path.getsize(vm1) != size:
            print("generating VM-like images ...", file=sys.stderr)
            make_vm(vm1, size)
            modify_vm(vm1, vm2)
        sets.append(("vm", vm1, vm2))
    if args.only in (None, "rootfs"):
        print("generating rootfs images ...", file=sys.stderr)
        r1, r2 = make_rootfs(args.work)
        sets.append(("rootfs", r1, r2))
    for name, img1, img2 in sets:
        rounds: dict[str, list[dict]] = {}
        for i in range(args.repeat):
            if args.repeat > 1:
                print(f"{name}: round {i + 1} of {args.repeat}", file=sys.stderr)
            for key, r in bench_round(args, name, img1, img2, tools, start=i).items():
                rounds.setdefault(key, []).append(r)
        report(name, os.path.getsize(img1), {k: median_of(v) for k, v in rounds.items()})


def bench_round(args: argparse.Namespace, name: str, img1: str, img2: str,
                tools: set[str], start: int = 0) -> dict:
    """Every configuration once; the order rotated by ``start`` (the round's number), so
    that across rounds no configuration always runs first — the first run after the
    image is made, or after another tool, was measured slower in every round."""
    jobs = []
    comps = ["lz4", "zstd,3"] if args.comp == "lz4,zstd,3" else args.comp.split(";")
    encs = [(e, "repokey-blake2" if e == "repokey" else e) for e in args.enc.split(",")]
    for enc, _ in encs:
        for comp in [c for c in args.dv_comp.split(";") if c]:
            jobs.append((f"diskvault {comp} {enc}", bench_diskvault, comp, enc))
    for comp in comps:
        for enc, benc in encs:
            if "diskvault" in tools:
                jobs.append((f"diskvault {comp} {enc}", bench_diskvault, comp, enc))
            if "borg" in tools:
                jobs.append((f"borg {comp} {benc}", bench_borg, comp, benc))
    got = {}
    k = start % len(jobs) if jobs else 0
    for key, fn, comp, enc in jobs[k:] + jobs[:k]:
        print(f"{name}: {key} ...", file=sys.stderr)
        got[key] = fn(args.work, img1, img2, comp, enc)
    results = {key: got[key] for key, *_ in jobs}  # reported in the table's order
    if not args.skip_restic and "restic" in tools:
        print(f"{name}: restic ...", file=sys.stderr)
        results["restic (zstd auto, encrypted)"] = bench_restic(args.work, img1, img2)
    return results


if __name__ == "__main__":
    main()
