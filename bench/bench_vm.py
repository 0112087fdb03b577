#!/usr/bin/env python3
"""`vm backup` of a running QEMU VM's disk: the second backup, idle and with 1 % churn,
against a full read of the same disk — time, CPU, bytes read, bytes stored.

The VM is paused (`-S`): no guest code runs, so the timings are diskvault's and QEMU's
alone; churn is written through QEMU's block layer (HMP `qemu-io` on the guest device's
backend — the path and the dirty bitmap a guest's own writes take), 1 % of the disk in
seeded random 64 KiB extents (the bitmap's granularity). For comparison: the same disk
backed up by reading everything (`disk backup` of the qcow2 with `--no-parent`, i.e.
what a tool without change tracking has to read every night) and Borg reading the
guest disk through the same export.

    python3 bench/bench_vm.py [--size-gib 8] [--work DIR]
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
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from vmkit import Guest  # noqa: E402

from diskvault.source.qmp import QmpClient  # noqa: E402

MiB = 1 << 20
DV = [sys.executable, "-m", "diskvault"]


def timed(cmd: list[str], env: dict, ok: tuple[int, ...] = (0,)) -> tuple[float, float, str]:
    t0, r0 = time.perf_counter(), os.times()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    r1 = os.times()
    if r.returncode not in ok:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    cpu = (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
    return time.perf_counter() - t0, cpu, r.stdout


def make_disk(path: str, gib: int, seed: int) -> None:
    """A VM-like guest disk: per 1 MiB, random / text / zeros / unallocated / half."""
    rnd = random.Random(seed)
    raw = path + ".raw"
    words = [bytes(rnd.choice(b"abcdefghijklmnop ") for _ in range(rnd.randint(2, 9)))
             for _ in range(2000)]
    text = b" ".join(rnd.choice(words) for _ in range(200000))[:MiB]
    with open(raw, "wb") as f:
        for i in range(gib * 1024):
            r = i % 5
            if r == 0:
                f.write(rnd.randbytes(MiB))
            elif r == 1:
                f.write(text[i % 7 :] + text[: i % 7])
            elif r == 3:
                f.seek(MiB, 1)
            else:
                f.write(rnd.randbytes(MiB // 2) + bytes(MiB // 2) if r == 4 else bytes(MiB))
        f.truncate(gib << 30)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, path], check=True)
    os.unlink(raw)


def churn(qmp: str, size: int, fraction: float, seed: int) -> int:
    rnd = random.Random(seed)
    n = int(size * fraction) // (64 << 10)
    with QmpClient(qmp) as q:
        for _ in range(n):
            off = rnd.randrange(size // (64 << 10)) * (64 << 10)
            q.execute("human-monitor-command", **{
                "command-line": f'qemu-io -d /machine/peripheral/vda/virtio-backend '
                f'"write -P {rnd.randrange(1, 255)} {off} 65536"'})
    return n * (64 << 10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=int, default=8)
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="bench-vm-")
    os.makedirs(work, exist_ok=True)
    disk = os.path.join(work, "vm.qcow2")
    for old in ("repo", "borg", "b", "cache"):  # a rerun in the same --work reuses the disk
        shutil.rmtree(os.path.join(work, old), ignore_errors=True)
    if not os.path.exists(disk):
        print(f"building a {a.size_gib} GiB guest disk in {work} ...", flush=True)
        make_disk(disk, a.size_gib, 1)
    env = dict(os.environ, DISKVAULT_PASSPHRASE="bench",
               DISKVAULT_CACHE_DIR=os.path.join(work, "cache"))
    repo = os.path.join(work, "repo")
    subprocess.run(DV + ["init", "-e", "repokey", repo], env=env, check=True,
                   capture_output=True)
    g = Guest(work, {"vda": disk}, paused=True)
    rows = []
    try:
        size = a.size_gib << 30

        def vmb(name: str) -> dict:
            wall, cpu, out = timed(DV + ["vm", "backup", "--json", "--qmp", g.qmp,
                                         f"{repo}::{name}"], env)
            arc = json.loads(out)["archives"][0]
            return {"wall": wall, "cpu": cpu, "read": arc["stats"]["read"],
                    "dirty": arc["dirty"], "stored": arc["stats"].get("new_stored", 0),
                    "mode": arc["mode"]}

        rows.append(("vm backup 1 (full)", vmb("v1")))
        rows.append(("vm backup 2 (idle)", vmb("v2")))
        changed = churn(g.qmp, size, 0.01, 2)
        rows.append((f"vm backup 3 (1 % churn: {changed / MiB:.0f} MiB)", vmb("v3")))
        changed = churn(g.qmp, size, 0.01, 3)
        # the same disk, read whole (what a tool without change tracking reads)
        wall, cpu, out = timed(DV + ["disk", "backup", "--json", "--no-parent",
                                     "--image-format", "qcow2", f"{repo}::full", disk], env)
        st = json.loads(out)["archive"]["stats"]
        rows.append(("disk backup, full read (--no-parent)",
                     {"wall": wall, "cpu": cpu, "read": st["read"], "dirty": 0,
                      "stored": st.get("new_stored", 0), "mode": "full"}))
        if shutil.which("borg"):
            borg_env = dict(env, BORG_PASSPHRASE="bench", BORG_BASE_DIR=os.path.join(work, "b"))
            brepo = os.path.join(work, "borg")
            subprocess.run(["borg", "init", "-e", "repokey-blake2", brepo], env=borg_env,
                           check=True, capture_output=True)
            from diskvault.source.qemu import ImageExport

            with ImageExport(disk, "qcow2") as exp:
                for n in ("b1", "b2"):
                    wall, cpu, _ = timed(["borg", "create", "--read-special", "-C", "lz4",
                                          "--chunker-params", "fixed,4194304",
                                          f"{brepo}::{n}", exp.path], borg_env,
                                         ok=(0, 1))  # 1: "file changed" (FUSE ctime)
                    rows.append((f"borg create --read-special of the guest disk ({n})",
                                 {"wall": wall, "cpu": cpu, "read": size, "dirty": 0,
                                  "stored": 0, "mode": "full"}))
    finally:
        g.stop()
    print(f"\n{'run':<48} {'wall s':>7} {'CPU s':>7} {'read MiB':>9} {'dirty MiB':>9} "
          f"{'stored MiB':>10}")
    for name, r in rows:
        print(f"{name:<48} {r['wall']:7.2f} {r['cpu']:7.2f} {r['read'] / MiB:9.1f} "
              f"{r['dirty'] / MiB:9.1f} {r['stored'] / MiB:10.2f}")
    full = next(r for n, r in rows if n.startswith("disk backup"))
    for name, r in rows[1:3]:
        print(f"{name}: {full['wall'] / max(r['wall'], 1e-9):.1f}× faster than a full read, "
              f"reads {100 * r['read'] / size:.2f} % of the disk")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
