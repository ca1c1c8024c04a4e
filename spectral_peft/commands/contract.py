"""What the file-to-file commands (reference, generate) promise on bad input: one line on stderr,
exit status 2, and no output file (outputs are written atomically, only after everything worked)."""
from __future__ import annotations

import os
import sys


def check_out_dir(out) -> None:
    """The directory of ``--out`` must exist (checked before any work)."""
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise ValueError(f"--out {out}: directory {out_dir} does not exist")


def run_or_exit2(command: str, work) -> int:
    """``work()``, or, on any failure, one line ``spectral-peft COMMAND: error: ...`` and 2."""
    try:
        work()
    except Exception as exc:  # every failure is one line and status 2: this is the command's contract
        msg = str(exc).replace("\n", " ") or type(exc).__name__
        if not isinstance(exc, (ValueError, OSError, KeyError)):
            msg = f"{type(exc).__name__}: {msg}"
        print(f"spectral-peft {command}: error: {msg}", file=sys.stderr)
        return 2
    return 0
