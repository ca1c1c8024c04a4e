"""bitsandbytes' own arithmetic, reproduced bit for bit for ``match="bitsandbytes"``
(quant/blockwise.py; docs/qlora.md, "Double quantisation: exact-nearest or bitsandbytes' choice").

Two choices differ from the exact-nearest default: the 8-bit code, which bitsandbytes' native CPU
kernel reads from a 65536-point table over [-1, 1] (:func:`lut_code_8bit`), and the offset of double
quantisation, torch.mean in float32 with ATen's own summation order (:func:`torch_mean_float32`).
"""
from __future__ import annotations

import numpy as np

from ..backend import get_xp, is_device_array

LUT_SIZE = 65536  # grid points of bitsandbytes' CPU 8-bit quantiser over [-1, 1]
TORCH_SUM_LANES = 8  # floats per Vectorized<float> in ATen's CPU sum kernel (as measured, AVX2 and AVX512)
TORCH_SUM_GRAIN = 32768  # at::internal::GRAIN_SIZE: below it ATen's sum runs on one thread


_LUTS: dict = {}


def bitsandbytes_lut(code):
    """(65536,) uint8: bitsandbytes' CPU table from grid point t to the code it stands for,
    #{k : m_k < g_t} with float32 midpoints m_k = fl32(0.5 · fl32(v_k + v_{k+1})) and grid
    g_t = fl32(-1 + fl32(2t / 65535)) (a grid point exactly on a midpoint goes to the lower code)."""
    code = np.asarray(code, dtype=np.float32)
    key = code.tobytes()
    if key not in _LUTS:
        mid = np.float32(0.5) * (code[:-1] + code[1:])  # (255,) float32
        t = np.arange(LUT_SIZE, dtype=np.float32)  # exact integers
        grid = np.float32(-1.0) + (np.float32(2.0) * t) / np.float32(LUT_SIZE - 1)  # (65536,) float32
        lut = np.searchsorted(mid, grid, side="left").astype(np.uint8)
        lut.setflags(write=False)
        _LUTS[key] = lut
    return _LUTS[key]


def lut_code_8bit(s, code):
    """(n,) float32 s = x · fl32(1/absmax) -> (n,) uint8 codes as bitsandbytes' native CPU kernel
    picks them: clamp to [-1, 1], the grid index trunc(((s + 1) · 0.5) · 65535 + 0.5) with every
    step rounded to float32, then the table of bitsandbytes_lut. A NaN s (an all-zero block)
    gets code 0, as the kernel writes for absmax = 0."""
    xp = get_xp(s)
    one, half = xp.float32(1.0), xp.float32(0.5)
    nan = xp.isnan(s)
    s = xp.clip(xp.where(nan, xp.float32(0.0), s), -1.0, 1.0).astype(xp.float32, copy=False)
    t = ((s + one) * half) * xp.float32(LUT_SIZE - 1) + half  # float32 at each step, in [0.5, 65535.5]
    idx = t.astype(xp.int32)  # truncation (t >= 0)
    q = xp.asarray(bitsandbytes_lut(code))[idx]
    return xp.where(nan, xp.uint8(0), q).astype(xp.uint8)


def _ceil_log2(k: int) -> int:
    """c10::utils::CeilLog2: 1 for k <= 2, else ceil(log2 k)."""
    return 1 if k <= 2 else (k - 1).bit_length()


def _cascade_sum_rows(rows):
    """(size, ...) float32 -> (...) float32: ATen's 4-level cascade over the leading axis
    (multi_row_sum in SumKernel.cpp). Runs of 2^p rows (p = max(4, CeilLog2(size) // 4)) are summed
    in order into level 0, and level j - 1 is added into level j (then cleared) each time the row
    count is a multiple of 2^(j p); the rest of the rows go into level 0; the result is
    ((level0 + level1) + level2) + level3, every addition in float32."""
    size = rows.shape[0]
    power = max(4, _ceil_log2(size) // 4)
    step, mask = 1 << power, (1 << power) - 1
    levels = [np.zeros(rows.shape[1:], dtype=np.float32) for _ in range(4)]
    runs = size // step
    # each run summed in order from zero: a float32 running sum (np.add.accumulate is sequential)
    run_sums = np.add.accumulate(rows[: runs * step].reshape(runs, step, *rows.shape[1:]), axis=1)[:, -1]
    for r in range(runs):
        i = (r + 1) * step  # rows consumed
        levels[0] = run_sums[r]
        for j in range(1, 4):
            levels[j] = levels[j] + levels[j - 1]
            levels[j - 1] = np.zeros_like(levels[j - 1])
            if i & (mask << (j * power)):
                break
    if runs * step < size:
        levels[0] = np.add.accumulate(rows[runs * step:], axis=0)[-1]
    return ((levels[0] + levels[1]) + levels[2]) + levels[3]


def _row_sum(elems):
    """(size, w) float32 -> (w,) float32: ATen's row_sum, four interleaved partial sums (ILP 4)
    over the rows, each a cascade; leftover rows go into partial 0; then p0 + p1 + p2 + p3."""
    size = elems.shape[0]
    groups = size // 4
    partials = _cascade_sum_rows(elems[: groups * 4].reshape(groups, 4, elems.shape[1]))  # (4, w)
    p0 = partials[0]
    for i in range(groups * 4, size):
        p0 = p0 + elems[i]
    for k in range(1, 4):
        p0 = p0 + partials[k]
    return p0


def _torch_sum_float32_serial(x):
    """(n,) float32 -> float32: one thread of ATen's CPU sum of a contiguous float32 vector. n < 8:
    row_sum over the scalars; otherwise row_sum over the n // 8 vectors of 8 lanes, then a scalar
    accumulator from 0 takes the n % 8 leftover elements and then the 8 lanes in order."""
    n = x.size
    if n < TORCH_SUM_LANES:
        return np.float32(_row_sum(x.reshape(n, 1))[0])
    nvec = n // TORCH_SUM_LANES
    lanes = _row_sum(x[: nvec * TORCH_SUM_LANES].reshape(nvec, TORCH_SUM_LANES))  # (8,)
    acc = np.float32(0.0)
    for v in list(x[nvec * TORCH_SUM_LANES:]) + list(lanes):
        acc = np.float32(acc + v)
    return acc


def torch_mean_float32(x, threads: int = 1):
    """torch.mean of a float32 vector on the CPU, bit for bit: fl32(sum / n) with ATen's sum.

    Up to TORCH_SUM_GRAIN elements (or with one thread) the sum is one serial cascade. Above it ATen
    splits the vector over its intra-op threads into ceil(n / t) chunks (t = min(threads,
    ceil(n / grain))) summed separately, then added in chunk order; pass torch.get_num_threads()
    of the run to be matched. (n,) float32 -> float32 scalar.
    """
    x = np.ascontiguousarray(np.asarray(x if not is_device_array(x) else x.get(), dtype=np.float32)).reshape(-1)
    if not isinstance(threads, (int, np.integer)) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    n = x.size
    t = min(int(threads), -(-n // TORCH_SUM_GRAIN))
    if n <= TORCH_SUM_GRAIN or t <= 1:
        total = _torch_sum_float32_serial(x)
    else:
        chunk = -(-n // t)
        total = np.float32(0.0)
        for start in range(0, n, chunk):
            total = np.float32(total + _torch_sum_float32_serial(x[start: start + chunk]))
    return np.float32(total / np.float32(n))
