"""The command line. Importing it sets what must be set before numpy is imported."""

import os

# numpy's OpenBLAS starts one thread per core at import and they spin waiting for work
# (~2 % of a backup's CPU in a perf profile, taken from the chunk workers). diskvault
# does no linear algebra; a user's explicit setting is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
