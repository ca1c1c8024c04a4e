"""Blockwise quantisation: 4-bit NF4/FP4 with double quantisation (QLoRA), 8-bit dynamic, int8 rows.

Shape legend: x any shape, n = x.size elements in row-major order; b = blocksize;
nb = ceil(n / b) blocks (a partial last block is allowed); packed (ceil(n/2), 1) uint8;
absmax (nb,) float32, or (nb,) uint8 under double quantisation with nested absmax (ceil(nb/256),).

The conventions are bitsandbytes' (``bitsandbytes/functional.py`` and its CPU backend
``backends/default/ops.py``, ``csrc/cpu_ops.cpp``, version 0.50), read as facts and re-implemented:

4-bit (``quantize_4bit``):
  absmax_j = max |x| over block j, in float32 (0 for an all-zero block);
  s = clamp(x · fl32(1 / max(absmax_j, 1e-38)), -1, 1) for full blocks, and
  s = clamp(x / max(absmax_last, 1e-38), -1, 1) for the partial last block (a true division;
  that block also STORES the clamped max(absmax_last, 1e-38), full blocks the raw absmax);
  q = the number of codebook midpoints m_k = (v_k + v_{k+1})/2 strictly below s, i.e. the nearest
  code with an exact midpoint going to the LOWER value (torch.bucketize, right=False); for FP4 the
  sorted index is mapped back to its bit pattern; byte = (q[2i] << 4) | q[2i+1], the first element
  in the HIGH nibble; an odd n is padded with one s = 0 element.
  Dequantise: code[q] · absmax_j in float32.
Double quantisation (``compress_statistics=True``): offset = mean(absmax) (float32);
  absmax - offset is quantised with 8-bit blockwise quantisation, blocksize 256, on the signed
  dynamic map; dequantise absmax = fl32(code8[q2] · absmax2) + offset.
8-bit blockwise (``quantize_blockwise``), two rules (``match``):
  "nearest" (default): s = x / absmax_j (float32 division), the nearest of the 256 dynamic-map
  values by float32 distance, ties to the lower index; the double-quantisation offset is the
  float64 mean rounded once.
  "bitsandbytes": bitsandbytes' native CPU kernel bit for bit: s = clamp(x · fl32(1/absmax_j), -1, 1),
  the grid index t = trunc(fl32(fl32(fl32(s + 1) · 0.5) · 65535) + 0.5) of 65536 points
  g_t = fl32(-1 + fl32(2t / 65535)), and the code #{k : fl32((v_k + v_{k+1}) / 2) < g_t} of that
  grid point (a 65536-entry table); an all-zero block gets codes 0. The offset is torch.mean in
  float32 (ATen's cascade sum, then / n).
int8 per row (``int8_vectorwise_quant``): stats = max|row|; q = round_half_even(x · fl32(127/stats)).

One canonical implementation of each operation is written for reading (``*_reference``); the
NumPy fast paths beside it (chunked, table driven) are tested equal to it bit for bit.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

from ..backend import get_xp, is_device_array
from .codebooks import QUANT_TYPES, get_4bit_code, get_dynamic_map, sorted_4bit_code
from .bnb_match import lut_code_8bit, torch_mean_float32
from .kernels import dequantize_4bit_cupy

# bitsandbytes.functional.quantize_4bit accepts exactly these block sizes.
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# bitsandbytes.functional.quantize_blockwise documents these (64..4096).
BLOCKSIZES_8BIT = (64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # double quantisation of the absmax (bitsandbytes quantize_4bit)
MATCH_RULES = ("nearest", "bitsandbytes")  # the 8-bit code choice (see the module docstring)
ABSMAX_FLOOR = np.float32(1e-38)  # absmax.clamp(min=1e-38) before scaling, as bitsandbytes
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
CHUNK = 1 << 16  # elements per chunk in the fast quantiser (fits in L2 with its temporaries)
# Elements per chunk of the fast dequantiser: 1 MiB of float32 output per chunk (measured fastest of
# 2^15..2^20 on the reference machine: fewer NumPy calls, and half a 2 MiB huge page per chunk).
DEQUANT_CHUNK = 1 << 18
# Threads of the NumPy fast paths (the reference machine has 2 cores); $SPECTRAL_PEFT_THREADS overrides.
PARALLEL_MIN_CHUNKS = 8  # chunks per thread below which one thread does all the work
FAST_PATH_THREADS = max(1, int(os.environ.get("SPECTRAL_PEFT_THREADS", min(2, os.cpu_count() or 1))))


@dataclass
class QuantState:
    """What dequantisation needs, named as bitsandbytes.functional.QuantState.

    absmax:     (nb,) float32 block maxima; (nb,) uint8 codes of them when ``state2`` is set.
    shape:      the original shape of x.
    code:       the codebook, (16,) float32 for nf4/fp4, (256,) for the dynamic map.
    blocksize:  elements per block.
    quant_type: "nf4", "fp4" or "dynamic" (8-bit blockwise).
    dtype:      the dtype x had (dequantisation returns float32 values; see dequantize_4bit).
    offset:     float32 scalar mean subtracted before double quantisation, or None.
    state2:     the QuantState of the quantised absmax (blocksize 256, dynamic map), or None.
    """

    absmax: object
    shape: tuple
    code: object
    blocksize: int
    quant_type: str
    dtype: str = "float32"
    offset: np.float32 | None = None
    state2: QuantState | None = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def nbytes(self) -> int:
        """Bytes of the per-block statistics (absmax, nested absmax and offset; codebooks, which
        are shared constants, excluded)."""
        total = int(self.absmax.nbytes)
        if self.nested:
            total += int(self.state2.absmax.nbytes) + 4  # + the float32 offset
        return total


# --- validation ---------------------------------------------------------------------------------
def _check_blocksize(blocksize, allowed, name="blocksize"):
    if not isinstance(blocksize, (int, np.integer)) or isinstance(blocksize, bool) or int(blocksize) not in allowed:
        raise ValueError(f"{name} must be one of {allowed} (bitsandbytes' allowed set), got {blocksize!r}")


def _check_quant_type(quant_type):
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def _check_match(match):
    if match not in MATCH_RULES:
        raise ValueError(f"match must be one of {MATCH_RULES}, got {match!r}")


def _as_float32_flat(x, name="x"):
    """Validate x (a float array, every value finite, at least one element) and return its row-major
    flattening in float32, (n,). float64 input is rounded to float32 first (bitsandbytes' statistics
    and scaling are float32)."""
    xp = get_xp(x)
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(x).__name__}")
    if np.dtype(x.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, float32 or float64, got dtype {x.dtype}")
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); nothing to quantise")
    flat = xp.ascontiguousarray(x).reshape(-1).astype(xp.float32, copy=False)
    finite = xp.isfinite(flat)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or Inf) of {flat.size}; "
                         "quantisation needs finite weights (bitsandbytes would silently produce garbage codes)")
    return flat


# --- 4-bit: the canonical implementation ---------------------------------------------------------
def block_absmax(flat, blocksize: int):
    """(n,) float32 -> (nb,) float32 max |x| per block, the last block possibly partial."""
    xp = get_xp(flat)
    n = flat.size
    full = n - n % blocksize
    absmax = xp.abs(flat[:full]).reshape(-1, blocksize).max(axis=1)  # (nb_full,)
    if full < n:
        absmax = xp.concatenate([absmax, xp.abs(flat[full:]).max(keepdims=True)])
    return absmax.astype(xp.float32, copy=False)


def _absmax_4bit(flat, blocksize: int):
    """block_absmax, with a partial last block's entry clamped to >= 1e-38 as bitsandbytes stores it."""
    absmax = block_absmax(flat, blocksize)
    if flat.size % blocksize:
        xp = get_xp(absmax)
        absmax[-1:] = xp.maximum(absmax[-1:], ABSMAX_FLOOR)
    return absmax


def scale_blocks(flat, absmax, blocksize: int):
    """s = clamp(x / absmax_j, -1, 1) exactly as bitsandbytes' CPU backend rounds it: full blocks
    multiply by the float32 reciprocal, the partial last block divides.  (n,) -> (n,) float32."""
    xp = get_xp(flat)
    n = flat.size
    full = n - n % blocksize
    floor = xp.maximum(absmax, ABSMAX_FLOOR)  # (nb,)
    recip = (xp.float32(1.0) / floor[: full // blocksize])[:, None]  # (nb_full, 1)
    s = (flat[:full].reshape(-1, blocksize) * recip).reshape(-1)
    if full < n:
        s = xp.concatenate([s, flat[full:] / floor[-1]])
    return xp.clip(s, -1.0, 1.0).astype(xp.float32, copy=False)


def pack_4bit(q):
    """(n,) codes 0..15 -> (ceil(n/2),) uint8: first element in the high nibble; odd n padded with
    the code ``q_pad`` of the pad element, which the caller appends before packing."""
    xp = get_xp(q)
    if q.size % 2:
        raise ValueError(f"pack_4bit needs an even number of codes, got {q.size}")
    q = q.astype(xp.uint8, copy=False)
    return (q[0::2] << 4) | q[1::2]


def unpack_4bit(packed, n: int):
    """(m,) uint8 -> (n,) uint8 codes, n <= 2m: high nibble first."""
    xp = get_xp(packed)
    flat = packed.reshape(-1)
    q = xp.empty(2 * flat.size, dtype=xp.uint8)
    q[0::2] = flat >> 4
    q[1::2] = flat & 0x0F
    return q[:n]


def quantize_4bit_reference(flat, blocksize: int, quant_type: str):
    """The readable 4-bit quantiser: (n,) float32 -> (packed (ceil(n/2),) uint8, absmax (nb,) float32)."""
    xp = get_xp(flat)
    _, order, midpoints = sorted_4bit_code(quant_type)
    absmax = _absmax_4bit(flat, blocksize)  # (nb,)
    s = scale_blocks(flat, absmax, blocksize)  # (n,) in [-1, 1]
    if s.size % 2:
        s = xp.concatenate([s, xp.zeros(1, dtype=xp.float32)])  # bitsandbytes pads with 0
    # q = #{k : m_k < s}: the nearest code, an exact midpoint going to the lower value.
    sorted_idx = xp.searchsorted(xp.asarray(midpoints), s, side="left")  # (n,) in 0..15
    q = xp.asarray(order)[sorted_idx]  # sorted position -> bit pattern (identity for nf4)
    return pack_4bit(q), absmax


def dequantize_4bit_reference(packed, absmax, blocksize: int, quant_type: str, n: int):
    """The readable 4-bit dequantiser: -> (n,) float32 code[q] · absmax_j."""
    xp = get_xp(packed)
    q = unpack_4bit(packed, n)
    values = xp.asarray(get_4bit_code(quant_type))[q]  # (n,)
    block = xp.arange(n) // blocksize
    return (values * absmax[block]).astype(xp.float32, copy=False)


# --- 4-bit: NumPy fast paths (tested equal to the reference) --------------------------------------
_PACK_TABLES: dict = {}
_PAIR_TABLES: dict = {}


def _pack_table(quant_type):
    """(256,) uint8: sorted-index pair (hi*16 + lo) -> packed byte of their bit patterns."""
    if quant_type not in _PACK_TABLES:
        _, order, _ = sorted_4bit_code(quant_type)
        hi, lo = np.divmod(np.arange(256), 16)
        _PACK_TABLES[quant_type] = ((order[hi].astype(np.uint8) << 4) | order[lo]).astype(np.uint8)
    return _PACK_TABLES[quant_type]


def _pair_table(quant_type):
    """(256,) uint64: byte -> its two float32 values (high nibble first) as one 64-bit word."""
    if quant_type not in _PAIR_TABLES:
        code = get_4bit_code(quant_type)
        hi, lo = np.divmod(np.arange(256), 16)
        pairs = np.stack([code[hi], code[lo]], axis=1).astype(np.float32)  # (256, 2)
        _PAIR_TABLES[quant_type] = np.ascontiguousarray(pairs).view(np.uint64).reshape(256)
    return _PAIR_TABLES[quant_type]


def _parallel_chunks(work, full: int, chunk: int) -> None:
    """Run work(start, stop) over [0, full) in chunks, split into contiguous runs over
    FAST_PATH_THREADS threads (NumPy releases the GIL inside take, comparisons and arithmetic)."""
    starts = list(range(0, full, chunk))
    # threads only pay on large matrices: a model's small weights stay on the calling thread
    threads = max(1, min(FAST_PATH_THREADS, len(starts) // PARALLEL_MIN_CHUNKS))

    def run(group):
        for start in group:
            work(start, min(start + chunk, full))

    if threads == 1:
        run(starts)
        return
    # contiguous runs: two threads never fault in the same (2 MiB huge) page of a fresh output
    per = -(-len(starts) // threads)
    groups = [starts[i * per: (i + 1) * per] for i in range(threads)]
    for future in [_pool().submit(run, g) for g in groups]:
        future.result()


_POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

        _POOL = ThreadPoolExecutor(max_workers=FAST_PATH_THREADS, thread_name_prefix="spectral_peft_quant")
    return _POOL


def _quantize_4bit_fast(flat: np.ndarray, blocksize: int, quant_type: str):
    """Chunked NumPy 4-bit quantiser, bit-identical to quantize_4bit_reference (same float32
    operations). Per chunk of whole blocks, while it is in cache: absmax, s = x · fl32(1/absmax),
    q = the number of midpoints below s (15 comparisons summed in uint8), then pairs of sorted
    indices packed through a 256-entry table (which also applies FP4's order)."""
    n = flat.size
    _, _, midpoints = sorted_4bit_code(quant_type)
    table = _pack_table(quant_type)
    nb = -(-n // blocksize)
    absmax = np.empty(nb, dtype=np.float32)
    npad = n + n % 2
    packed = np.empty(npad // 2, dtype=np.uint8)
    full = n - n % blocksize
    chunk = max(blocksize, (CHUNK // blocksize) * blocksize)  # whole blocks per chunk
    local = threading.local()

    def work(start, stop):
        if not hasattr(local, "s"):  # per-thread scratch
            local.s = np.empty(chunk, dtype=np.float32)
            local.acc = np.empty(chunk, dtype=np.uint8)
            local.cmp = np.empty(chunk, dtype=np.bool_)
        m, j0, j1 = stop - start, start // blocksize, stop // blocksize
        s, acc, cmp = local.s[:m], local.acc[:m], local.cmp[:m]
        x = flat[start:stop].reshape(-1, blocksize)
        np.abs(x, out=s.reshape(-1, blocksize))
        np.max(s.reshape(-1, blocksize), axis=1, out=absmax[j0:j1])
        recip = np.float32(1.0) / np.maximum(absmax[j0:j1], ABSMAX_FLOOR)
        np.multiply(x, recip[:, None], out=s.reshape(-1, blocksize))
        _codes_into(s, midpoints, acc, cmp)
        packed[start // 2: stop // 2] = table[acc[0::2] * np.uint8(16) + acc[1::2]]

    _parallel_chunks(work, full, chunk)
    if full < n:  # the partial last block: divided (not multiplied by the reciprocal); stores the clamp
        absmax[-1] = max(np.abs(flat[full:]).max(), ABSMAX_FLOOR)
        tail = np.zeros(npad - full, dtype=np.float32)
        np.divide(flat[full:], absmax[-1], out=tail[: n - full])
        t_acc = np.empty(tail.size, dtype=np.uint8)
        _codes_into(tail, midpoints, t_acc, np.empty(tail.size, dtype=np.bool_))
        packed[full // 2:] = table[t_acc[0::2] * np.uint8(16) + t_acc[1::2]]
    return packed, absmax


def _codes_into(s, midpoints, acc, cmp):
    """acc = #{k : midpoints[k] < clip(s, -1, 1)} (sorted index), computed in place."""
    np.clip(s, -1.0, 1.0, out=s)
    acc[...] = 0
    for m in midpoints:
        np.greater(s, m, out=cmp)
        acc += cmp.view(np.uint8)


def _quad_table(quant_type):
    """(65536,) complex128 used as 16-byte words: a little-endian uint16 of two packed bytes
    (b0 | b1 << 8) -> the four float32 values code[b0 >> 4], code[b0 & 15], code[b1 >> 4],
    code[b1 & 15]. 1 MiB; it halves the number of gathers of the 256-entry pair table."""
    key = ("quad", quant_type)
    if key not in _PAIR_TABLES:
        code = get_4bit_code(quant_type)
        v = np.arange(65536)
        b0, b1 = v & 0xFF, v >> 8
        quad = np.stack([code[b0 >> 4], code[b0 & 0x0F], code[b1 >> 4], code[b1 & 0x0F]], axis=1)
        _PAIR_TABLES[key] = np.ascontiguousarray(quad.astype(np.float32)).view(np.complex128).reshape(65536)
    return _PAIR_TABLES[key]


def _dequantize_4bit_fast(packed: np.ndarray, absmax: np.ndarray, blocksize: int, quant_type: str, n: int):
    """Table-driven NumPy dequantiser, bit-identical to dequantize_4bit_reference.

    Every two packed bytes (four codes) are looked up at once as one 16-byte word of four float32
    values (np.take into a view of the output), then each block is multiplied by its absmax in
    place while the chunk is still in cache. A partial last block goes through the byte-pair table.
    """
    flat = np.ascontiguousarray(packed).reshape(-1)
    out = np.empty(2 * flat.size, dtype=np.float32)
    full = n - n % blocksize  # a multiple of 32 elements = 8 uint16 words
    quads = out[:full].view(np.complex128)  # (full/4,) four values per word
    words = flat[: full // 2].view(np.uint16)  # (full/4,) two bytes per word
    table = _quad_table(quant_type)
    chunk = max(blocksize, (DEQUANT_CHUNK // blocksize) * blocksize)  # elements per chunk, whole blocks

    def work(start, stop):
        np.take(table, words[start // 4: stop // 4], out=quads[start // 4: stop // 4], mode="clip")
        block = out[start:stop].reshape(-1, blocksize)
        block *= absmax[start // blocksize: stop // blocksize, None]

    _parallel_chunks(work, full, chunk)
    if full < n:
        tail = out[full:].view(np.uint64)  # one 8-byte word (two values) per remaining byte
        np.take(_pair_table(quant_type), flat[full // 2:], out=tail)
        out[full:n] *= absmax[-1]
    return out[:n]


# --- 8-bit blockwise (the dynamic map) ------------------------------------------------------------
def _nearest_code_8bit(s, code):
    """(n,) normalised float32 values -> (n,) uint8 index of the nearest code value by float32
    distance, ties to the lower index (the code at or below s, moved up one only when strictly
    closer: the rule of bitsandbytes' earlier binary-search CPU kernel; 0.50's is _lut_code_8bit).
    A NaN s (an all-zero block, 0/0) gets index 0."""
    xp = get_xp(s)
    code = xp.asarray(code)
    left = xp.clip(xp.searchsorted(code, s, side="right") - 1, 0, code.size - 1)  # code[left] <= s
    right = xp.minimum(left + 1, code.size - 1)
    d_left = xp.abs(s - code[left])  # float32 distances, as the C code computes them
    d_right = xp.abs(s - code[right])
    idx = xp.where(d_right < d_left, right, left)
    idx = xp.where(xp.isnan(s), 0, idx)
    return idx.astype(xp.uint8)


def quantize_blockwise(x, code=None, blocksize: int = 4096, match: str = "nearest"):
    """8-bit blockwise quantisation: (any shape) float -> (q uint8 same shape, QuantState).

    Each block of ``blocksize`` row-major elements is scaled by its absmax (float32) and mapped to
    one of the 256 values of ``code`` (default: the signed dynamic map): the nearest one
    (``match="nearest"``), or the one bitsandbytes' native CPU kernel picks through its
    65536-point grid (``match="bitsandbytes"``, bit for bit; see the module docstring).
    """
    _check_blocksize(blocksize, BLOCKSIZES_8BIT)
    _check_match(match)
    flat = _as_float32_flat(x)
    code = get_dynamic_map() if code is None else np.asarray(code, dtype=np.float32)
    if code.shape != (256,) or not np.all(np.diff(code) >= 0):
        raise ValueError(f"code must be a sorted (256,) codebook, got shape {code.shape}")
    q, absmax = _quantize_blockwise_flat(flat, code, blocksize, match)
    state = QuantState(absmax=absmax, shape=tuple(x.shape), code=code, blocksize=blocksize,
                       quant_type="dynamic", dtype=str(x.dtype))
    return q.reshape(x.shape), state


def _quantize_blockwise_flat(flat, code, blocksize, match="nearest"):
    """(n,) float32 -> (codes (n,) uint8, absmax (nb,) float32) under the ``match`` rule."""
    xp = get_xp(flat)
    n = flat.size
    absmax = block_absmax(flat, blocksize)  # (nb,)
    block = xp.arange(n) // blocksize
    with np.errstate(invalid="ignore", divide="ignore"):
        if match == "bitsandbytes":  # x · fl32(1/absmax); an all-zero block gives 0·inf = NaN
            s = flat * (xp.float32(1.0) / absmax)[block]
            return lut_code_8bit(s, code), absmax
        s = flat / absmax[block]  # float32 division; 0/0 -> NaN for an all-zero block
    return _nearest_code_8bit(s, code), absmax


def dequantize_blockwise(q, state: QuantState):
    """Inverse of quantize_blockwise: -> float32 array of state.shape, code[q] · absmax_j."""
    xp = get_xp(q)
    n = q.size
    absmax = dequantize_absmax(state)  # (nb,) float32
    block = xp.arange(n) // state.blocksize
    out = xp.asarray(state.code)[q.reshape(-1)] * absmax[block]
    return out.astype(xp.float32, copy=False).reshape(state.shape)


# --- the public 4-bit API -------------------------------------------------------------------------
def quantize_4bit(x, blocksize: int = 64, quant_type: str = "nf4", compress_statistics: bool = False,
                  fast: bool | None = None, match: str = "nearest"):
    """4-bit blockwise quantisation, as bitsandbytes.functional.quantize_4bit.

    Args:
        x: float16/32/64 array of any shape (n elements, row-major), every value finite.
        blocksize: one of BLOCKSIZES_4BIT. quant_type: "nf4" or "fp4".
        compress_statistics: double quantisation of the absmax (QLoRA).
        fast: use the NumPy fast path (default: on NumPy arrays); False runs the reference.
        match: how double quantisation picks its 8-bit codes and offset: "nearest" (the exact
            nearest code, the float64 mean) or "bitsandbytes" (bitsandbytes' native CPU choice
            and torch's float32 mean, bit for bit). The 4-bit codes are bitsandbytes' either way.
    Returns:
        packed (ceil(n/2), 1) uint8 and a QuantState.
    """
    _check_blocksize(blocksize, BLOCKSIZES_4BIT)
    _check_quant_type(quant_type)
    if not isinstance(compress_statistics, (bool, np.bool_)):
        raise TypeError(f"compress_statistics must be a bool, got {compress_statistics!r}")
    _check_match(match)
    flat = _as_float32_flat(x)
    use_fast = (not is_device_array(flat)) if fast is None else (fast and not is_device_array(flat))
    if use_fast:
        packed, absmax = _quantize_4bit_fast(flat, blocksize, quant_type)
    else:
        packed, absmax = quantize_4bit_reference(flat, blocksize, quant_type)
    xp = get_xp(flat)
    code = xp.asarray(get_4bit_code(quant_type))
    state = QuantState(absmax=absmax, shape=tuple(x.shape), code=code, blocksize=blocksize,
                       quant_type=quant_type, dtype=str(x.dtype))
    if compress_statistics:
        state = double_quantize(state, match=match)
    return packed.reshape(-1, 1), state


def double_quantize(state: QuantState, offset=None, match: str = "nearest") -> QuantState:
    """Replace a float32 absmax by offset = mean(absmax) and 8-bit codes of absmax - offset
    (blocksize 256, dynamic map).

    ``match="nearest"``: the offset is the float64 mean rounded once to float32 and each code the
    nearest one. ``match="bitsandbytes"``: the offset is torch's float32 mean (torch_mean_float32)
    and the codes those of bitsandbytes' CPU kernel, so that the state equals
    bitsandbytes.functional.quantize_4bit(..., compress_statistics=True) bit for bit.
    ``offset`` may be given (a float32 scalar) to reproduce another implementation's mean exactly.
    """
    _check_match(match)
    xp = get_xp(state.absmax)
    absmax = state.absmax
    if offset is None and match == "bitsandbytes":
        offset = torch_mean_float32(absmax)
    elif offset is None:
        offset = np.float32(float(absmax.astype(xp.float64).mean()))
    offset = np.float32(offset)
    centred = (absmax - xp.float32(offset)).astype(xp.float32)  # (nb,)
    code8 = xp.asarray(get_dynamic_map())
    q2, absmax2 = _quantize_blockwise_flat(centred, code8, NESTED_BLOCKSIZE, match)
    state2 = QuantState(absmax=absmax2, shape=(absmax.size,), code=code8, blocksize=NESTED_BLOCKSIZE,
                        quant_type="dynamic", dtype="float32")
    return QuantState(absmax=q2, shape=state.shape, code=state.code, blocksize=state.blocksize,
                      quant_type=state.quant_type, dtype=state.dtype, offset=offset, state2=state2)


def dequantize_absmax(state: QuantState):
    """The (nb,) float32 block maxima of a state (4-bit or 8-bit), undoing double quantisation when
    present: fl32(fl32(code8[q2] · absmax2) + offset), the product and the sum rounded separately
    as bitsandbytes does (dequantize_blockwise of the nested state, then + offset)."""
    if not state.nested:
        return state.absmax
    xp = get_xp(state.absmax)
    return dequantize_blockwise(state.absmax, state.state2) + xp.float32(state.offset)  # (nb,)


def dequantize_4bit(packed, state: QuantState, fast: bool | None = None):
    """Inverse of quantize_4bit: -> float32 array of state.shape.

    The values are float32 whatever dtype x had (bitsandbytes' CPU dequantisation computes in
    float32); a caller working in float64 casts them, which is exact.
    """
    if state.quant_type not in QUANT_TYPES:
        raise ValueError(f"state.quant_type must be one of {QUANT_TYPES}, got {state.quant_type!r}")
    _check_blocksize(state.blocksize, BLOCKSIZES_4BIT, "state.blocksize")
    n = int(np.prod(state.shape))
    if packed.dtype != np.uint8 or packed.size != (n + 1) // 2:
        raise ValueError(f"packed must be uint8 with {(n + 1) // 2} bytes for shape {state.shape}, "
                         f"got {packed.dtype} with {packed.size}")
    absmax = dequantize_absmax(state)
    if is_device_array(packed):
        return dequantize_4bit_cupy(packed, absmax, state.blocksize, state.quant_type, n).reshape(state.shape)
    if fast is None or fast:
        out = _dequantize_4bit_fast(np.asarray(packed), absmax, state.blocksize, state.quant_type, n)
    else:
        out = dequantize_4bit_reference(packed, absmax, state.blocksize, state.quant_type, n)
    return out.reshape(state.shape)


# --- int8 per-row absmax (LLM.int8's vector-wise quantisation) -----------------------------------
def int8_vectorwise_quant(x):
    """(..., d) float -> (q int8 same shape, row_stats (rows,) float32): q = round(x · 127/max|row|),
    half to even, as bitsandbytes.functional.int8_vectorwise_quant (threshold 0). An all-zero row
    gets codes 0 and stats 0."""
    flat = _as_float32_flat(x)
    xp = get_xp(flat)
    if x.ndim < 1:
        raise ValueError("int8_vectorwise_quant needs at least one dimension")
    rows = flat.reshape(-1, x.shape[-1])  # (R, d)
    stats = xp.abs(rows).max(axis=1).astype(xp.float32)  # (R,)
    with np.errstate(divide="ignore"):
        scale = xp.where(stats > 0, xp.float32(127.0) / stats, xp.float32(0.0)).astype(xp.float32)
    q = xp.rint(rows * scale[:, None]).astype(xp.int8)
    return q.reshape(x.shape), stats


def int8_vectorwise_dequant(q, stats):
    """Inverse: q · stats · fl32(1/127) in float32 (bitsandbytes multiplies by 7.874015718698502e-3)."""
    xp = get_xp(q)
    rows = q.reshape(-1, q.shape[-1]).astype(xp.float32)
    out = rows * stats.astype(xp.float32)[:, None] * xp.float32(7.874015718698502e-3)
    return out.reshape(q.shape)


def bits_per_parameter(blocksize: int = 64, compress_statistics: bool = False) -> float:
    """Storage cost per weight, in the limit of large n: 4 bits of code + statistics.
    4 + 32/b without double quantisation; 4 + 8/b + 32/(256 b) with it (4.5 and ≈ 4.127 at b = 64)."""
    _check_blocksize(blocksize, BLOCKSIZES_4BIT)
    if compress_statistics:
        return 4.0 + 8.0 / blocksize + 32.0 / (NESTED_BLOCKSIZE * blocksize)
    return 4.0 + 32.0 / blocksize
