"""Host/device transfer accounting and the transfer guard.

Every device-to-host synchronisation ("d2h": ``to_host``, ``.get()``, ``float(x)``, ``int(x)``,
``bool(x)``, ``.item()``, ``.tolist()``) and host-to-device copy ("h2d": ``to_device``,
``xp.asarray(host)``, a host index array) that passes the backend seam or the emulated device is
recorded here with the array (dtype and shape), the operation and the call site (file:line of the
first frame outside spectral_peft.backend and spectral_peft.emulated).

``explicit`` events are the API edges (``to_device``, ``to_host``, ``.get()``, and the named
scalar reads of :func:`spectral_peft.backend.host_scalar`); every other event is implicit. With
``SPECTRAL_PEFT_TRANSFER_GUARD=error`` an implicit event in a training step after the first
(``armed`` by :func:`spectral_peft.backend.begin_step`), or any implicit event inside
:func:`guard`, raises :class:`TransferError`, as ``jax.transfer_guard("disallow")`` and
``torch.cuda.set_sync_debug_mode("error")`` do; ``log`` prints each one to stderr instead.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from dataclasses import dataclass

ENV_GUARD = "SPECTRAL_PEFT_TRANSFER_GUARD"
GUARD_MODES = ("allow", "log", "error")
_SKIP_DIRS = (os.sep + os.path.join("spectral_peft", "emulated") + os.sep,
              os.sep + os.path.join("spectral_peft", "backend.py"))


class TransferError(RuntimeError):
    """An implicit host/device transfer while the transfer guard is "error"."""


@dataclass(frozen=True)
class Event:
    """One transfer: kind "d2h" or "h2d", the operation, the array, the call site, and whether it
    was explicit; ``name`` is the label of a named read (host_scalar), else the call site."""

    kind: str
    op: str
    array: str
    site: str
    explicit: bool
    name: str


class Ledger:
    """Counts of transfers since the process started (or :meth:`reset`)."""

    def __init__(self):
        self.reset()
        self._mode_override: list[str] = []
        self.armed = False  # inside a training step after the first: $SPECTRAL_PEFT_TRANSFER_GUARD applies

    def reset(self) -> None:
        self.d2h = 0
        self.h2d = 0
        self.by_name: Counter = Counter()
        self.events: list[Event] = []  # the most recent events (bounded), for diagnosis

    def snapshot(self) -> dict:
        """{"d2h": n, "h2d": n, "by_name": {name: n}}, a copy."""
        return {"d2h": self.d2h, "h2d": self.h2d, "by_name": dict(self.by_name)}

    @property
    def mode(self) -> str:
        if self._mode_override:
            return self._mode_override[-1]
        if not self.armed:
            return "allow"
        mode = os.environ.get(ENV_GUARD, "allow").strip().lower() or "allow"
        if mode not in GUARD_MODES:
            raise ValueError(f"${ENV_GUARD} must be one of {GUARD_MODES}, got {mode!r}")
        return mode

    def record(self, kind: str, op: str, array, explicit: bool, name: str | None = None) -> None:
        """Count one transfer; under the guard an implicit one raises TransferError naming it."""
        site = call_site()
        ev = Event(kind, op, describe(array), site, explicit, name or f"{op} at {site}")
        if not explicit:
            mode = self.mode
            if mode == "error":
                raise TransferError(f"implicit {_KIND[kind]} ({op} of {ev.array}) at {site}; "
                                    f"${ENV_GUARD}=error allows only to_device/to_host/.get() and named "
                                    "host_scalar reads")
            if mode == "log":
                print(f"spectral_peft transfer: implicit {_KIND[kind]} ({op} of {ev.array}) at {site}",
                      file=sys.stderr)
        if kind == "d2h":
            self.d2h += 1
        else:
            self.h2d += 1
        self.by_name[ev.name] += 1
        self.events.append(ev)
        if len(self.events) > 4096:
            del self.events[:2048]


_KIND = {"d2h": "device-to-host sync", "h2d": "host-to-device copy"}
LEDGER = Ledger()


def describe(a) -> str:
    """'float32 (3, 4) array' for an array, else its type name."""
    shape, dtype = getattr(a, "shape", None), getattr(a, "dtype", None)
    if shape is None or dtype is None:
        return type(a).__name__
    return f"{dtype} {tuple(shape)} array"


def call_site() -> str:
    """file:line (function) of the innermost frame outside the seam and the emulation."""
    f = sys._getframe(1)
    while f is not None and any(d in f.f_code.co_filename for d in _SKIP_DIRS):
        f = f.f_back
    if f is None:
        return "<unknown>"
    return f"{f.f_code.co_filename}:{f.f_lineno} ({f.f_code.co_name})"


@contextlib.contextmanager
def guard(mode: str = "error"):
    """Within the block, implicit transfers are handled as ``mode`` ("allow", "log", "error")."""
    if mode not in GUARD_MODES:
        raise ValueError(f"guard mode must be one of {GUARD_MODES}, got {mode!r}")
    LEDGER._mode_override.append(mode)
    try:
        yield LEDGER
    finally:
        LEDGER._mode_override.pop()


def since(before: dict) -> dict:
    """The transfers recorded after ``before`` (a :meth:`Ledger.snapshot`): d2h, h2d, by_name."""
    now = LEDGER.snapshot()
    names = {k: v - before["by_name"].get(k, 0) for k, v in now["by_name"].items()}
    return {"d2h": now["d2h"] - before["d2h"], "h2d": now["h2d"] - before["h2d"],
            "by_name": {k: v for k, v in names.items() if v}}
