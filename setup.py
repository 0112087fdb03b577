"""The one native part: keyed BLAKE3 over many 4 KiB blocks at once (block fingerprints).

Optional: without a C compiler the package installs and hashes the blocks with blake3-py,
the same digests at about half the speed (src/diskvault/crypto/blockhash.py).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("diskvault.crypto._blockhash", ["src/diskvault/crypto/_blockhash.c"],
                             extra_compile_args=["-O3"], optional=True)])
