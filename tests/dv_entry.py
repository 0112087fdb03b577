"""The diskvault CLI as the test suite runs it: with a weak KDF (test-only).

Tests create hundreds of keys; the production cost (64 MiB, 3 passes) would dominate
their run time. The weakening lives here, outside the package, so no switch in the
production crypto can weaken a real repository's key.
Run as ``python tests/dv_entry.py ARGS...`` (support.DV is that command line).
"""

from __future__ import annotations

import sys

WEAK_KDF = {"time_cost": 1, "memory_kib": 64, "parallelism": 1}


def weaken_kdf() -> None:
    from diskvault.crypto import kdf

    kdf.NEW_KEY_COST.clear()
    kdf.NEW_KEY_COST.update(WEAK_KDF)


if __name__ == "__main__":
    weaken_kdf()
    from diskvault.cli.main import main

    sys.exit(main())
