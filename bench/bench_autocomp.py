#!/usr/bin/env python3
"""Stored bytes and compression CPU of `lz4` vs `auto,lz4` over an image's non-zero
4 MiB windows (what `create` with the fixed chunker would compress), in one process:

    python3 bench/bench_autocomp.py IMAGE
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "src"))
from diskvault.repository.compression import Compression  # noqa: E402
from diskvault.source.content import is_zero  # noqa: E402


def main() -> None:
    specs = {s: Compression.parse(s) for s in ("lz4", "auto,lz4")}
    tot = {s: [0, 0.0] for s in specs}
    n = raw = 0
    with open(sys.argv[1], "rb") as f:
        while b := f.read(4 << 20):
            if is_zero(b):
                continue
            n += 1
            raw += len(b)
            for s, c in specs.items():
                t = time.thread_time()
                head, body = c.encode(b)
                tot[s][1] += time.thread_time() - t
                tot[s][0] += len(head) + len(body)
    print(f"{sys.argv[1]}: {n} non-zero 4 MiB windows, {raw / 2**20:.0f} MiB")
    for s, (size, cpu) in tot.items():
        print(f"  {s:9} stored {size / 2**20:9.1f} MiB  compression CPU {cpu:6.2f} s")


if __name__ == "__main__":
    main()
