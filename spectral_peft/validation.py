"""Field checkers shared by every config dataclass (every field range-checked at construction).

Each checker takes the owner (the config's class name, e.g. ``"LoraConfig"``), the field name and
the value, and either returns the value or raises :class:`ConfigError` with a message naming all
three and what would be right::

    LoraConfig.lora_alpha must be a number > 0, got nan (not finite)

:class:`ConfigError` is both a ``ValueError`` and a ``TypeError``, so callers catching either (a
wrong kind of value is a TypeError in Python's convention, a wrong value a ValueError) see it.

Rules common to all checkers:

- ``bool`` is never an int or a number here (``True`` is not a rank), and ``"yes"``, ``2`` or
  ``None`` are never a bool;
- numbers are finite unless ``finite=False`` (NaN and ±inf are refused, as is an int too large
  for a float);
- ``hint`` (optional) is appended after the value: why the range is what it is.

No shapes: these functions check scalars and small containers only.
"""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping

import numpy as np

__all__ = ["ConfigError", "check_int", "check_float", "check_bool", "check_choice", "check_optional_str",
           "check_optional_path", "check_str_list", "check_mapping"]


class ConfigError(ValueError, TypeError):
    """A config field holds a value it cannot mean (a ValueError and a TypeError at once)."""


def _fail(owner: str, name: str, what: str, value, hint: str = "", note: str = "") -> None:
    msg = f"{owner}.{name} must be {what}, got {value!r}"
    if note:
        msg += f" ({note})"
    if hint:
        msg += f"; {hint}"
    raise ConfigError(msg)


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def _range_text(lo, hi, lo_inclusive: bool, hi_inclusive: bool) -> str:
    if lo is not None and hi is not None:
        return f" in {'[' if lo_inclusive else '('}{lo}, {hi}{']' if hi_inclusive else ')'}"
    if lo is not None:
        return f" {'>=' if lo_inclusive else '>'} {lo}"
    if hi is not None:
        return f" {'<=' if hi_inclusive else '<'} {hi}"
    return ""


def _in_range(x, lo, hi, lo_inclusive: bool, hi_inclusive: bool) -> bool:
    if lo is not None and not (x >= lo if lo_inclusive else x > lo):
        return False
    if hi is not None and not (x <= hi if hi_inclusive else x < hi):
        return False
    return True


def check_int(owner: str, name: str, value, min=None, max=None, *, min_inclusive: bool = True,  # noqa: A002
              max_inclusive: bool = True, hint: str = ""):
    """An integer (Python or NumPy, never a bool) within the given bounds; returns ``int(value)``.

    ``check_int("LoraConfig", "r", 0, min=0, min_inclusive=False)`` raises
    "LoraConfig.r must be an integer > 0, got 0".
    """
    what = "an integer" + _range_text(min, max, min_inclusive, max_inclusive)
    if _is_bool(value) or not isinstance(value, (int, np.integer)):
        _fail(owner, name, what, value, hint)
    if not _in_range(int(value), min, max, min_inclusive, max_inclusive):
        _fail(owner, name, what, value, hint)
    return int(value)


def check_float(owner: str, name: str, value, min=None, max=None, *, min_inclusive: bool = True,  # noqa: A002
                max_inclusive: bool = True, finite: bool = True, noun: str = "a number", hint: str = ""):
    """A real number (int or float, Python or NumPy, never a bool or a string) within the bounds,
    finite unless ``finite=False``; returns ``float(value)``.

    ``check_float("LoraConfig", "lora_alpha", nan, min=0, min_inclusive=False)`` raises
    "LoraConfig.lora_alpha must be a number > 0, got nan (not finite)".
    """
    what = noun + _range_text(min, max, min_inclusive, max_inclusive)
    if _is_bool(value) or not isinstance(value, numbers.Real):
        _fail(owner, name, what, value, hint)
    try:
        x = float(value)
    except OverflowError:  # an int beyond float's range
        _fail(owner, name, what, value, hint, "too large for a float")
    if finite and not math.isfinite(x):
        _fail(owner, name, what, value, hint, "not finite")
    if math.isnan(x) or not _in_range(x, min, max, min_inclusive, max_inclusive):
        _fail(owner, name, what, value, hint)
    return x


def check_bool(owner: str, name: str, value, hint: str = "") -> bool:
    """Exactly True or False (a NumPy bool too); 1, "yes" and None are refused."""
    if not _is_bool(value):
        _fail(owner, name, "True or False", value, hint)
    return bool(value)


def check_choice(owner: str, name: str, value, choices, hint: str = ""):
    """One of ``choices``, compared with its type as well (so 1 is not True, and True is not 1)."""
    for c in choices:
        if type(value) is type(c) and value == c:
            return value
    _fail(owner, name, f"one of {tuple(choices)!r}", value, hint)


def check_optional_str(owner: str, name: str, value, hint: str = ""):
    """None or a str (free text, e.g. PEFT's task_type)."""
    if value is not None and not isinstance(value, str):
        _fail(owner, name, "a string or None", value, hint)
    return value


def check_optional_path(owner: str, name: str, value, hint: str = ""):
    """None, a non-empty str, or an os.PathLike (the path is not opened here)."""
    if value is None or isinstance(value, os.PathLike) or (isinstance(value, str) and value):
        return value
    _fail(owner, name, "a path (a non-empty string) or None", value, hint)


def check_str_list(owner: str, name: str, value, *, allow_str: bool = False, allow_none: bool = False,
                   allow_empty: bool = True, hint: str = ""):
    """A list (or tuple) of strings; also a single str when ``allow_str`` (a regex, PEFT's rule)
    and None when ``allow_none``."""
    what = "a list of strings" + (", a string" if allow_str else "") + (" or None" if allow_none else "")
    if value is None:
        if not allow_none:
            _fail(owner, name, what, value, hint)
        return value
    if isinstance(value, str):
        if not allow_str:
            _fail(owner, name, what, value, hint)
        return value
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        _fail(owner, name, what, value, hint)
    if not allow_empty and not value:
        _fail(owner, name, "a non-empty " + what[2:], value, hint)
    return value


def check_mapping(owner: str, name: str, value, key_type: type = str,
                  value_checker: Callable[[str, str, object], object] | None = None, *, allow_none: bool = False,
                  hint: str = ""):
    """A mapping whose keys are ``key_type`` and whose values pass
    ``value_checker(owner, f"{name}[{key!r}]", v)`` (a checker above, partially applied);
    returns a plain dict (None when ``allow_none`` and the value is None)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, Mapping):
        _fail(owner, name, f"a dict {{{key_type.__name__}: value}}" + (" or None" if allow_none else ""), value, hint)
    for k, v in value.items():
        if not isinstance(k, key_type):
            _fail(owner, f"{name} key", f"a {key_type.__name__}", k, hint)
        if value_checker is not None:
            value_checker(owner, f"{name}[{k!r}]", v)
    return dict(value)
