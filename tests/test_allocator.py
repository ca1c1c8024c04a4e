"""allocator.keep_freed_memory: freed activation-sized blocks are reused, not faulted in again.

Each case runs in a fresh interpreter (mallopt changes the whole process): 20 "steps" that each
write six 8 MiB arrays and free them all. Under glibc's default policy the freed 48 MiB at the top
of the heap exceeds the (adaptive) trim threshold and goes back to the kernel, so every step faults
its pages in again; once keep_freed_memory() has run the memory stays in the heap and later steps
fault (almost) nothing.
"""
import platform
import subprocess
import sys

import pytest

PROGRAM = """
import resource, sys
import numpy as np
from spectral_peft.allocator import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
np.ones(2 * 2**20).sum()  # warm NumPy itself up
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # a "step": six 8 MiB activations held together, then all freed
    held = [np.empty(2**20) for _ in range(6)]
    for a in held:
        a.fill(1.0)
    del held, a
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, timeout=60, check=True)
    took, faults = out.stdout.split()
    return took, int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="keep_freed_memory tunes glibc's malloc; elsewhere it is a no-op")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    _, default = _faults("default")
    took, kept = _faults("keep")
    assert took == "True"
    pages = 48 * 2**20 // 4096  # one step's
    # measured here: default ~61,000 (glibc's adaptive thresholds catch up only now and then), kept ~2,000
    assert default >= 3 * pages, f"the default policy faulted only {default} pages in 20 steps of {pages}"
    assert kept <= pages and kept * 10 <= default, \
        f"with keep_freed_memory the 20 steps faulted {kept} pages (default {default}; one step is {pages})"


def test_is_idempotent():
    from spectral_peft.allocator import keep_freed_memory

    assert keep_freed_memory() == keep_freed_memory()
