"""The shared config-field checkers (spectral_peft/validation.py): what each accepts, what each
refuses, and that the message names owner.field, the value and the expected range."""
from __future__ import annotations

import math

import numpy as np
import pytest

from spectral_peft import validation as V


def refused(fn, *args, **kwargs) -> str:
    with pytest.raises(V.ConfigError) as info:
        fn("Cfg", "f", *args, **kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)
    return str(info.value)


def test_check_int():
    assert V.check_int("Cfg", "f", 3, min=0) == 3
    assert V.check_int("Cfg", "f", np.int64(2), min=0, max=2) == 2
    assert refused(V.check_int, 0, min=0, min_inclusive=False) == "Cfg.f must be an integer > 0, got 0"
    assert refused(V.check_int, 5, min=1, max=4) == "Cfg.f must be an integer in [1, 4], got 5"
    for bad in (True, 1.0, "1", None, [1]):
        assert refused(V.check_int, bad, min=0).endswith(f"got {bad!r}")


def test_check_float():
    assert V.check_float("Cfg", "f", 1, min=0) == 1.0
    assert V.check_float("Cfg", "f", 0.0, min=0.0, max=1.0, max_inclusive=False) == 0.0
    assert refused(V.check_float, math.nan, min=0, min_inclusive=False) == \
        "Cfg.f must be a number > 0, got nan (not finite)"
    assert "not finite" in refused(V.check_float, -math.inf)
    assert "too large" in refused(V.check_float, 10**400)
    assert refused(V.check_float, 1.0, min=0, max=1, max_inclusive=False) == \
        "Cfg.f must be a number in [0, 1), got 1.0"
    assert V.check_float("Cfg", "f", math.inf, finite=False) == math.inf
    assert "(not finite)" not in refused(V.check_float, math.nan, finite=False)  # NaN is never in range
    for bad in (True, np.bool_(False), "0.1", None, [0.1]):
        refused(V.check_float, bad)


def test_check_bool_and_choice():
    assert V.check_bool("Cfg", "f", False) is False and V.check_bool("Cfg", "f", np.bool_(True)) is True
    for bad in ("yes", 2, 1, 0, None):
        assert refused(V.check_bool, bad) == f"Cfg.f must be True or False, got {bad!r}"
    assert V.check_choice("Cfg", "f", "gaussian", (True, False, "gaussian")) == "gaussian"
    assert V.check_choice("Cfg", "f", True, (True, False)) is True
    for bad in (1, 0, "x", None):  # 1 == True, but 1 is not a choice of (True, False)
        assert refused(V.check_choice, bad, (True, False, "gaussian")).startswith("Cfg.f must be one of (True, False")


def test_strings_paths_and_lists():
    assert V.check_optional_str("Cfg", "f", None) is None and V.check_optional_str("Cfg", "f", "") == ""
    for bad in (1, 1.5, ["a"]):
        refused(V.check_optional_str, bad)
        refused(V.check_optional_path, bad)
    refused(V.check_optional_path, "")
    assert V.check_str_list("Cfg", "f", ["a", "b"]) == ["a", "b"]
    assert V.check_str_list("Cfg", "f", "a.*", allow_str=True) == "a.*"
    assert V.check_str_list("Cfg", "f", None, allow_none=True) is None
    refused(V.check_str_list, "a")
    refused(V.check_str_list, None)
    refused(V.check_str_list, [1], allow_str=True)
    assert "non-empty" in refused(V.check_str_list, [], allow_empty=False)


def test_check_mapping():
    pos_int = lambda o, k, v: V.check_int(o, k, v, min=1)  # noqa: E731
    assert V.check_mapping("Cfg", "f", {"q": 2}, str, pos_int) == {"q": 2}
    assert V.check_mapping("Cfg", "f", None, allow_none=True) is None
    assert refused(V.check_mapping, {"q": 0}, str, pos_int) == "Cfg.f['q'] must be an integer >= 1, got 0"
    assert "Cfg.f key" in refused(V.check_mapping, {1: 2}, str, pos_int)
    for bad in (1, "x", [1], None):
        assert refused(V.check_mapping, bad).startswith("Cfg.f must be a dict")
