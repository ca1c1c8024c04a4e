"""Pin the BLAS/OpenMP thread count from ``--threads N`` (default 2) before NumPy loads OpenBLAS:
a benchmark imports this module first, then NumPy. ``THREADS`` is the number chosen."""
from __future__ import annotations

import os
import sys


def threads_from_argv(default: int = 2) -> int:
    """--threads N or --threads=N from sys.argv, else ``default`` (argparse runs too late for BLAS)."""
    argv = sys.argv
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return default


THREADS = threads_from_argv()
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, str(THREADS))
