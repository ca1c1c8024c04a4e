"""The validation every model forward and generation share: input ids, masks, integer ranges, and the
host/device edge of the API. Each raises ValueError naming the input and what would be right,
before any computation.
"""
from __future__ import annotations

import numpy as np

from .backend import get_xp, host_scalar, is_device_array, to_device


def _xp_of(a):
    return get_xp(a)


def to_backend(a, backend):
    """A host or device array -> this backend's device (the API edge; a no-op on the CPU)."""
    if backend.on_device and not is_device_array(a):
        return to_device(np.asarray(a), backend)
    if backend.device == "cpu" and is_device_array(a):
        raise ValueError("a GPU array was passed to a CPU model; move it to the host first")
    return a


def check_input_ids(input_ids, vocab_size: int, max_positions: int, max_name: str):
    """input_ids must be int (B, T), 1 <= T <= max_positions, every id in [0, vocab_size)."""
    if not hasattr(input_ids, "dtype") or input_ids.dtype.kind not in "iu":
        raise ValueError(f"input_ids must be an integer array (B, T), got {getattr(input_ids, 'dtype', type(input_ids).__name__)}")
    if input_ids.ndim != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape (B, T) with B, T >= 1, got {tuple(input_ids.shape)}")
    T = input_ids.shape[1]
    if T > max_positions:
        raise ValueError(f"input_ids: sequence length T = {T} exceeds {max_name} = {max_positions}")
    xp = _xp_of(input_ids)
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if host_scalar(bad.any(), "input check"):
        i = int(xp.argmax(bad.reshape(-1)))
        raise ValueError(f"input_ids: token id {int(input_ids.reshape(-1)[i])} at flat position {i} is outside "
                         f"[0, vocab_size) with vocab_size = {vocab_size}")


def check_mask(mask, shape: tuple, name: str = "attention_mask"):
    """A (B, T) mask of 0/1 (bool, int or float) -> a bool array (True = real token), or None."""
    if mask is None:
        return None
    if not hasattr(mask, "dtype") or mask.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be a bool/int/float array of 0/1, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have input_ids' shape (B, T) = {tuple(shape)}, got {tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 (padding) and 1 (real token)")
    return mask != 0


def check_int_range(a, shape: tuple, low: int, high: int, name: str, ignore: int | None = None):
    """``a`` must be int with ``shape`` and values in [low, high) (or equal to ``ignore``)."""
    if not hasattr(a, "dtype") or a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array of shape {tuple(shape)}, got {getattr(a, 'dtype', type(a).__name__)}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    bad = (a < low) | (a >= high)
    if ignore is not None:
        bad &= a != ignore
    if host_scalar(bad.any(), "input check"):
        xp = _xp_of(a)
        i = int(xp.argmax(bad.reshape(-1)))
        extra = f" or {ignore} (ignored)" if ignore is not None else ""
        raise ValueError(f"{name}: value {int(a.reshape(-1)[i])} at flat position {i} is outside [{low}, {high}){extra}")
