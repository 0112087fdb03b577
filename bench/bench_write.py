#!/usr/bin/env python3
"""Write-path benchmark: first `create` of one image, configurations run back to back
in rounds, medians of wall time and CPU-seconds (user+sys) — for a busy machine where
single runs are noise. Optionally `extract --stdout` of each diskvault archive.

    python3 bench/bench_write.py IMAGE [--rounds 3] [--repo-dir /dev/shm/x]
        [--configs "borg:lz4:none,dv:lz4:none,dv:auto,lz4:none"] [--extract]
        [--baseline-src /path/to/other/src]   # adds "base:..." configs: another checkout

A config is TOOL:COMPRESSION:ENCRYPTION, TOOL one of borg, dv, base (diskvault run
with PYTHONPATH=--baseline-src); compression may contain commas (``dv:auto,lz4:none``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import DV, MiB, du, run, warm  # noqa: E402

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
ENV = {"DISKVAULT_PASSPHRASE": "bench", "BORG_PASSPHRASE": "bench",
       "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
       "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes", "BORG_CACHE_DIR": "/var/tmp/bench-borg-cache"}


NICE: list[str] = []


def parse(spec: str) -> tuple[str, str, str]:
    tool, rest = spec.split(":", 1)
    comp, enc = rest.rsplit(":", 1)
    return tool, comp, enc


def one(cfg: str, image: str, repo_dir: str, baseline: str | None, extract: bool) -> dict:
    tool, comp, enc = parse(cfg)
    repo = os.path.join(repo_dir, "r-" + cfg.replace(":", "-").replace(",", "_"))
    shutil.rmtree(repo, ignore_errors=True)
    env = dict(ENV)
    # "dv" is this checkout, whatever diskvault is installed; "base" another one
    env["PYTHONPATH"] = (baseline or "") if tool == "base" else SRC
    if tool == "borg":
        benc = "repokey-blake2" if enc == "repokey" else enc
        subprocess.run(["borg", "init", "-e", benc, repo], env={**os.environ, **env},
                       check=True, capture_output=True)
        warm(image)
        res = {"create": run([*NICE, "borg", "create", "--read-special", "--chunker-params",
                              "fixed,4194304", "-C", comp, f"{repo}::one", image], env)}
        if extract:
            res["extract"] = run([*NICE, "borg", "extract", "--stdout", f"{repo}::one"], env)
    else:
        subprocess.run([*DV, "init", "-e", enc, repo], env={**os.environ, **env}, check=True,
                       capture_output=True)
        warm(image)
        res = {"create": run([*NICE, *DV, "create", "-C", comp, f"{repo}::one", image], env)}
        if extract:
            res["extract"] = run([*NICE, *DV, "extract", "--stdout", f"{repo}::one"], env)
    res["repo"] = du(repo)
    shutil.rmtree(repo)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("image")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repo-dir", default="/var/tmp/diskvault-bench")
    ap.add_argument("--configs", default="borg:lz4:none,dv:lz4:none,borg:lz4:repokey,"
                                         "dv:lz4:repokey")
    ap.add_argument("--baseline-src")
    ap.add_argument("--extract", action="store_true")
    ap.add_argument("--nice", type=int, help="run the measured commands under nice -n N: "
                    "on a machine shared with other work, -20 gives every tool the cores "
                    "alike, so wall times mean what they would on an idle machine")
    args = ap.parse_args()
    global NICE
    NICE = [] if args.nice is None else ["nice", "-n", str(args.nice)]
    configs = _split(args.configs)
    os.makedirs(args.repo_dir, exist_ok=True)
    size = os.path.getsize(args.image)
    gib = size / (1 << 30)
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for c in configs:
            print(f"round {r + 1}: {c} ...", file=sys.stderr, flush=True)
            res = one(c, args.image, args.repo_dir, args.baseline_src, args.extract)
            results[c].append(res)
            cr = res["create"]
            print(f"  {c:28} wall {cr['wall']:6.1f} s  cpu {cr['cpu']:6.1f} s  "
                  f"rss {cr['rss']:5.0f} MiB", file=sys.stderr, flush=True)
    print(f"\n=== {args.image}: {size / MiB:.0f} MiB, {args.rounds} rounds, medians ===")
    print(f"{'config':28} {'create s':>9} {'MB/s':>6} {'cpu s':>7} {'cpu s/GiB':>9} "
          f"{'RSS MiB':>8} {'repo MiB':>8} {'extract s':>9} {'extr cpu':>8}")
    med: dict[str, dict[str, float]] = {}
    for c, rs in results.items():
        m = {"wall": statistics.median(x["create"]["wall"] for x in rs),
             "cpu": statistics.median(x["create"]["cpu"] for x in rs),
             "rss": max(x["create"]["rss"] for x in rs), "repo": rs[-1]["repo"]}
        if args.extract:
            m["xwall"] = statistics.median(x["extract"]["wall"] for x in rs)
            m["xcpu"] = statistics.median(x["extract"]["cpu"] for x in rs)
        med[c] = m
        print(f"{c:28} {m['wall']:9.1f} {size / MiB / m['wall']:6.0f} {m['cpu']:7.1f} "
              f"{m['cpu'] / gib:9.2f} {m['rss']:8.0f} {m['repo'] / MiB:8.1f} "
              + (f"{m['xwall']:9.1f} {m['xcpu']:8.1f}" if args.extract else ""))
    print("vs borg, same compression and encryption (speed: borg time / this time; "
          "cpu: this / borg):")
    for c, m in med.items():
        tool, comp, enc = parse(c)
        b = med.get(f"borg:{comp.removeprefix('auto,')}:{enc}")
        if tool == "borg" or b is None:
            continue
        line = f"  {c:28} create x{b['wall'] / m['wall']:.2f}  cpu {m['cpu'] / b['cpu']:.2f}"
        if args.extract:
            line += f"  extract x{b['xwall'] / m['xwall']:.2f}"
        print(line)


def _split(s: str) -> list[str]:
    """Split "a:b,c:d,e:f:g" at the commas that start a new TOOL: field."""
    out: list[str] = []
    for piece in s.split(","):
        if piece.split(":")[0] in ("borg", "dv", "base"):
            out.append(piece)
        else:
            out[-1] += "," + piece
    return out


if __name__ == "__main__":
    main()
