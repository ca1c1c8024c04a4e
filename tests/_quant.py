"""Helpers shared by the quantisation tests (live bitsandbytes and its golden trace)."""
import numpy as np

from spectral_peft.quant import create_dynamic_map


def bits(a):
    """The raw float32 bit patterns, so -0.0 != +0.0 and NaN payloads count."""
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32)).view(np.uint32)


def assert_codes_match_or_nearer(ours, theirs, values, absmax, blocksize, max_fraction=0.01):
    """Our 8-bit codes are the exact nearest (float32 distance, ties low). bitsandbytes 0.50's native
    CPU quantiser looks s up on a grid of fl32(s + 1) with spacing 2^-15 and so, near zero, skips
    the dynamic map's finest codes (an exact 0 becomes 2.1e-5), and near some midpoints it picks
    the farther neighbour. Where the codes differ, ours must be the nearer one."""
    code = create_dynamic_map()
    diff = np.nonzero(ours != theirs)[0]
    s = values[diff] / absmax[diff // blocksize]
    d_ours = np.abs(s - code[ours[diff]])
    d_theirs = np.abs(s - code[theirs[diff]])
    assert np.all(d_ours <= d_theirs), "a differing code where bitsandbytes was the nearer"
    assert diff.size <= max(4, int(max_fraction * values.size)), f"{diff.size} of {values.size} codes differ"


def offset_ulps(ours, theirs) -> int:
    """Distance in float32 units in the last place between two offsets (means of the absmax)."""
    return abs(int(np.float32(ours).view(np.int32)) - int(np.float32(theirs).view(np.int32)))
