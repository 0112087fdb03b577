"""Two optional native parts, each with a pure-Python fallback that gives the same results:

- ``diskvault.crypto._blockhash``: keyed BLAKE3 over many 4 KiB blocks at once (block
  digests: fingerprints and version 3 chunk ids); without it blake3-py, about half the
  speed (src/diskvault/crypto/blockhash.py);
- ``diskvault.repository._lz4``: LZ4 block compression without python-lz4's copy of
  the output; needs liblz4's headers (Debian: liblz4-dev); without it python-lz4
  (src/diskvault/repository/compression.py).

A missing compiler or header only skips the part (``optional=True``).
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("diskvault.crypto._blockhash", ["src/diskvault/crypto/_blockhash.c"],
              extra_compile_args=["-O3"], optional=True),
    Extension("diskvault.repository._lz4", ["src/diskvault/repository/_lz4.c"],
              libraries=["lz4"], extra_compile_args=["-O2"], optional=True),
])
