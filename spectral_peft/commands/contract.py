"""What every command promises on bad input: one line on stderr, exit status 2, and nothing left
behind (no output file, no run folder). File-to-file commands (reference, generate) write their
outputs atomically, only after everything worked; `run` checks every option before it creates its
run folder.

The helpers here are the one place that contract is written down: :func:`run_or_exit2` turns any
failure of a command's work into that line, :func:`check_out_dir` / :func:`check_folder_option`
check output paths before any work, and :func:`help_text` writes an option's help line with its
default stated once.
"""
from __future__ import annotations

import os
import sys


def check_out_dir(out) -> None:
    """``--out FILE``: not a directory, and its directory exists (checked before any work)."""
    if os.path.isdir(out):
        raise ValueError(f"--out {out}: is a directory; name the output file, e.g. "
                         f"{os.path.join(out, 'out.safetensors')}")
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise ValueError(f"--out {out}: directory {out_dir} does not exist")


def check_folder_option(option: str, path) -> None:
    """``--OPTION DIR``: a folder the command will create or write into. It must be a directory, or
    not exist yet under a writable directory; checked before anything is created."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {path}: exists and is not a directory")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{option} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: {existing} is not writable")


def help_text(text: str, default=None, *, boolean: bool = False, flag: bool = False) -> str:
    """An option's help line: ``text``, then what a boolean accepts, then the default once.

    default: the value shown as ``(default: ...)``; None shows none (a required option, or a text
    that already says what happens when the option is absent, as ``(default: ...)``).
    boolean: the option takes a value of true/false (1/0, yes/no, on/off). flag: it takes no value.
    """
    if "(default:" in text and default is not None:
        raise ValueError(f"help {text!r} states its default already")
    parts = [text.strip()]
    if boolean:
        parts.append("true or false (also 1/0, yes/no, on/off)")
    if flag:
        parts.append("a flag: takes no value")
    line = "; ".join(p for p in parts if p)
    if default is not None:
        shown = ("true" if default else "false") if isinstance(default, bool) else default
        line += f" (default: {shown})"
    return line


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
