#!/usr/bin/env python3
"""Remote benchmark: backup and restore of a VM-like image to SeaweedFS S3 on loopback,
against the same to a local directory, and against restic to the same S3 server.

    python3 bench/bench_remote.py [--size-gib 2] [--work DIR] [--skip-restic]

The image is bench_core.py's ``make_vm`` (40 % random, 20 % text-like, 40 % zeros and
holes). A private ``weed server -s3`` is started on 127.0.0.1 with a Prometheus
endpoint, whose ``SeaweedFS_s3_request_total`` counters give the number of requests
each run made (by type); "stored" is the size of what the run left in the bucket.
Every restore is compared with the image by SHA-256.

Targets (issue 5): S3 backup ≥ 70 % of the local throughput; ≤ 100 requests per GiB
stored for fresh data.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_core import du, make_vm  # noqa: E402
from storage.servers import SeaweedServer, free_port  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30


class MeteredSeaweed(SeaweedServer):
    """The test suite's SeaweedFS, plus its Prometheus metrics port."""

    def choose_ports(self) -> None:
        super().choose_ports()
        self.ports["metrics"] = free_port()

    def argv(self) -> list[str]:
        return [*super().argv(), f"-metricsPort={self.ports['metrics']}"]

    def requests(self) -> dict[str, int]:
        """Requests served so far, by type (GET, PUT, LIST, HEAD, DELETE, …)."""
        url = f"http://127.0.0.1:{self.ports['metrics']}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        out: dict[str, int] = {}
        for m in re.finditer(r'^SeaweedFS_s3_request_total\{([^}]*)\} (\S+)$', text, re.M):
            kind = re.search(r'type="([^"]*)"', m.group(1))
            key = kind.group(1) if kind else "?"
            out[key] = out.get(key, 0) + int(float(m.group(2)))
        return out

    def cpu(self) -> float:
        """CPU seconds the server process has used (it shares the 2 cores with the client)."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def put_ceiling(self, threads: int = 4, objects: int = 32) -> float:
        """MB/s the server takes for plain 32 MiB PUTs (boto3, no backup tool around it)."""
        from concurrent.futures import ThreadPoolExecutor

        import boto3
        from botocore.config import Config

        c = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                         aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                         config=Config(s3={"addressing_style": "path"}, max_pool_connections=16,
                                       read_timeout=300))
        data = [os.urandom(32 * MiB) for _ in range(threads)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda i: c.put_object(Bucket=self.bucket, Key=f"ceiling/{i}",
                                               Body=data[i % threads]), range(objects)))
        rate = objects * 32 * MiB / (time.perf_counter() - t0) / 1e6
        for i in range(objects):
            c.delete_object(Bucket=self.bucket, Key=f"ceiling/{i}")
        return rate

    def stored(self, prefix: str) -> int:
        pages = self.client().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix)
        return sum(o["Size"] for p in pages for o in p.get("Contents", ()))


def timed(cmd: list[str] | str, env: dict, stdin=None, stdout=None) -> dict:
    """Run under /usr/bin/time: wall seconds, CPU seconds, peak RSS in MiB."""
    fd, tfile = tempfile.mkstemp()
    os.close(fd)
    shell = isinstance(cmd, str)
    full = (f"/usr/bin/time -o {tfile} -f '%U %S %M' {cmd}" if shell
            else ["/usr/bin/time", "-o", tfile, "-f", "%U %S %M", *cmd])
    t0 = time.perf_counter()
    r = subprocess.run(full, env={**os.environ, **env}, stdin=stdin,
                       stdout=stdout or subprocess.DEVNULL, stderr=subprocess.PIPE, shell=shell)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed: {cmd}\n{r.stderr.decode()[-2000:]}")
    with open(tfile) as f:
        user, sys_, rss = (float(x) for x in f.read().split()[-3:])
    os.unlink(tfile)
    return {"wall": wall, "cpu": user + sys_, "rss": rss / 1024}


def restore_sha(cmd: list[str] | str, env: dict) -> tuple[dict, str]:
    """Time a restore to stdout and hash what it wrote (through a file: no pipe stall)."""
    with tempfile.TemporaryFile() as out:
        t = timed(cmd, env, stdout=out)
        out.seek(0)
        h = hashlib.sha256()
        while b := out.read(16 * MiB):
            h.update(b)
    return t, h.hexdigest()


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(16 * MiB):
            h.update(b)
    return h.hexdigest()


class Run:
    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size
        self.backup: dict = {}
        self.restore: dict = {}
        self.stored = 0
        self.req_backup: dict[str, int] = {}
        self.req_restore: dict[str, int] = {}
        self.server_cpu = 0.0  # seconds the S3 server spent on the backup

    def mbps(self, phase: dict) -> float:
        return self.size / phase["wall"] / 1e6


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def bench_diskvault(name: str, repo: str, img: str, want: str, server: MeteredSeaweed | None,
                    prefix: str, extra: list[str]) -> Run:
    env = {"DISKVAULT_PASSPHRASE": "bench"}
    run = Run(name, os.path.getsize(img))
    dv = [sys.executable, "-m", "diskvault"]
    subprocess.run([*dv, "init", "-e", "repokey", repo], env={**os.environ, **env}, check=True,
                   capture_output=True)
    before = server.requests() if server else {}
    cpu0 = server.cpu() if server else 0.0
    run.backup = timed([*dv, "create", *extra, f"{repo}::vm", img], env)
    mid = server.requests() if server else {}
    run.server_cpu = server.cpu() - cpu0 if server else 0.0
    run.req_backup = delta(mid, before)
    run.stored = server.stored(prefix) if server else du(repo)
    # a restore as on another machine: nothing cached
    renv = {**env, "DISKVAULT_CACHE_DIR": tempfile.mkdtemp(prefix="dv-bench-cache-")}
    run.restore, got = restore_sha([*dv, "extract", "--stdout", f"{repo}::vm"], renv)
    shutil.rmtree(renv["DISKVAULT_CACHE_DIR"], ignore_errors=True)
    run.req_restore = delta(server.requests(), mid) if server else {}
    if got != want:
        raise SystemExit(f"{name}: the restore differs from the image")
    return run


def bench_restic(name: str, repo: str, img: str, want: str, server: MeteredSeaweed | None,
                 prefix: str, work: str) -> Run:
    env = {"RESTIC_PASSWORD": "bench", "RESTIC_REPOSITORY": repo,
           "RESTIC_CACHE_DIR": os.path.join(work, f"restic-cache-{name}")}
    if server:
        env.update(AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key)
    run = Run(name, os.path.getsize(img))
    subprocess.run(["restic", "init", "-q"], env={**os.environ, **env}, check=True,
                   capture_output=True)
    before = server.requests() if server else {}
    cpu0 = server.cpu() if server else 0.0
    run.backup = timed(f"restic backup -q --stdin --stdin-filename vm.img < {img}", env)
    mid = server.requests() if server else {}
    run.server_cpu = server.cpu() - cpu0 if server else 0.0
    run.req_backup = delta(mid, before)
    run.stored = server.stored(prefix) if server else du(repo)
    shutil.rmtree(env["RESTIC_CACHE_DIR"], ignore_errors=True)  # restore as elsewhere
    run.restore, got = restore_sha("restic dump -q latest vm.img", env)
    run.req_restore = delta(server.requests(), mid) if server else {}
    if got != want:
        raise SystemExit(f"{name}: the restore differs from the image")
    return run


def report(runs: list[Run], size: int) -> None:
    print(f"\n=== {size / GiB:.1f} GiB VM-like image (40 % random, 20 % text, 40 % zero) ===")
    print(f"{'run':26} {'backup MB/s':>11} {'restore MB/s':>12} {'stored MiB':>10} "
          f"{'RSS MiB':>7} {'cpu s':>6} {'server cpu s':>12} {'backup req':>10} "
          f"{'req/GiB stored':>14} {'restore req':>11}")
    for r in runs:
        nb = sum(r.req_backup.values())
        per = f"{nb / (r.stored / GiB):.1f}" if r.req_backup else "-"
        print(f"{r.name:26} {r.mbps(r.backup):11.0f} {r.mbps(r.restore):12.0f} "
              f"{r.stored / MiB:10.0f} {max(r.backup['rss'], r.restore['rss']):7.0f} "
              f"{r.backup['cpu']:6.1f} {r.server_cpu or '-'!s:>12.5} {(nb or '-')!s:>10} "
              f"{per:>14} {(sum(r.req_restore.values()) or '-')!s:>11}")
    for r in runs:
        if r.req_backup:
            print(f"  {r.name}: backup {dict(sorted(r.req_backup.items()))}, "
                  f"restore {dict(sorted(r.req_restore.items()))}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--work", default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument("--skip-restic", action="store_true")
    ap.add_argument("--upload-connections", type=int, default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="dv-bench-remote-", dir=args.work)
    img = os.path.join(work, "vm.img")
    make_vm(img, int(args.size_gib * GiB) // (4 * MiB) * (4 * MiB))
    want = sha256(img)
    extra = [] if args.upload_connections is None else [
        "--upload-connections", str(args.upload_connections)]
    server = MeteredSeaweed(Path(work) / "seaweedfs", bucket="bench")
    server.start_fresh()
    runs: list[Run] = []
    try:
        runs.append(bench_diskvault("diskvault local dir", os.path.join(work, "dv-local"), img,
                                    want, None, "", extra))
        runs.append(bench_diskvault("diskvault S3 (SeaweedFS)", server.url("dv"), img, want,
                                    server, "dv/", extra))
        if not args.skip_restic and shutil.which("restic"):
            runs.append(bench_restic("restic local dir", os.path.join(work, "restic-local"),
                                     img, want, None, "", work))
            runs.append(bench_restic("restic S3 (SeaweedFS)",
                                     f"s3:{server.endpoint}/{server.bucket}/restic", img,
                                     want, server, "restic/", work))
        ceiling = server.put_ceiling()
    finally:
        server.stop()
    report(runs, os.path.getsize(img))
    local, s3 = runs[0], runs[1]
    print(f"\ndiskvault S3/local: backup {s3.mbps(s3.backup) / local.mbps(local.backup):.0%}, "
          f"restore {s3.mbps(s3.restore) / local.mbps(local.restore):.0%} (target ≥ 70 %); "
          f"{sum(s3.req_backup.values()) / (s3.stored / GiB):.1f} requests per GiB stored "
          f"(target ≤ 100)")
    stored_rate = s3.stored / s3.backup["wall"] / 1e6
    print(f"the server itself takes {ceiling:.0f} MB/s of plain 32 MiB PUTs (4 streams); the "
          f"S3 backup sent it {stored_rate:.0f} MB/s ({stored_rate / ceiling:.0%} of that), "
          f"while the server used {s3.server_cpu:.1f} CPU s and diskvault "
          f"{s3.backup['cpu']:.1f} CPU s of the {os.cpu_count()} cores")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
