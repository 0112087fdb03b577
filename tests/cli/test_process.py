"""What the CLI process is like before it does anything: no threads it did not ask for."""

from __future__ import annotations

import os
import subprocess
import sys


def test_importing_the_cli_starts_no_threads():
    """numpy's OpenBLAS used to start a spinning thread per core at import: measurable CPU
    taken from the chunk workers of every backup (perf: ~0.25 of 5 CPU-seconds)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS")}
    code = ("import os, diskvault.cli.main, numpy; "
            "print(len(os.listdir('/proc/self/task')), os.environ['OPENBLAS_NUM_THREADS'])")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       timeout=60, check=True)
    assert r.stdout.split() == [b"1", b"1"], r.stdout
    # a user's own setting is kept
    r = subprocess.run([sys.executable, "-c", code], env={**env, "OPENBLAS_NUM_THREADS": "2"},
                       capture_output=True, timeout=60, check=True)
    assert r.stdout.split()[1] == b"2"
