"""The codebooks of 4-bit and 8-bit blockwise quantisation: NF4, FP4 and the signed dynamic map.

Shape legend: every codebook is a float32 vector, (16,) for the 4-bit types and (256,) for the
8-bit dynamic map; ``midpoints`` are (15,) / (255,).

Each codebook is BUILT here by its documented construction, in the float32 arithmetic bitsandbytes
uses; the tests check the result against the values QLoRA and bitsandbytes publish
(tests/test_quant.py holds them, with their source) and against bitsandbytes' own tables
(tests/golden/). Facts from bitsandbytes-foundation/bitsandbytes ``bitsandbytes/functional.py``
(``create_normal_map``, ``create_dynamic_map``, ``get_4bit_type``) and Dettmers et al. 2023
(QLoRA, arXiv 2305.14314).
"""
from __future__ import annotations

import numpy as np

QUANT_TYPES = ("nf4", "fp4")


def linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps) in float32, reproduced bit for bit.

    PyTorch rounds start, end and step = (end - start)/(steps - 1) to float32, fills the first
    half as start + i·step and the second half as end - (steps-1-i)·step, each with one rounding
    (a fused multiply-add). The product of a float32 step and a small integer is exact in float64,
    so computing in float64 and rounding once reproduces it. bitsandbytes builds its maps with it.

    Returns: (steps,) float32.
    """
    a, b = np.float32(start), np.float32(end)
    step = np.float32((b - a) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    low = np.float64(a) + np.float64(step) * i
    high = np.float64(b) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, low, high).astype(np.float32)


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> np.ndarray:
    """The NormalFloat codebook: quantiles of N(0, 1) scaled into [-1, 1], sorted.

    With ``use_extra_value`` (NF4): 8 positive values Φ⁻¹(linspace(offset, 0.5, 9)[:-1]),
    7 negative values -Φ⁻¹(linspace(offset, 0.5, 8)[:-1]) and an exact 0, so 0 is representable
    and the type is asymmetric; without it, 7 and 7 plus 0 (15 values). Divided by the maximum.

    Returns: (16,) float32 (NF4), or (15,) without the extra value.
    """
    from scipy.stats import norm  # noqa: PLC0415 - scipy is a dependency; imported where used

    n_pos = 9 if use_extra_value else 8
    positive = norm.ppf(linspace_float32(offset, 0.5, n_pos)[:-1].astype(np.float64))
    negative = -norm.ppf(linspace_float32(offset, 0.5, 8)[:-1].astype(np.float64))
    values = np.sort(np.concatenate([positive, [0.0], negative]).astype(np.float32))
    return values / values.max()  # float32 division, as bitsandbytes does


def create_fp4_map() -> np.ndarray:
    """The FP4 (E2M1) codebook in bitsandbytes' bit-pattern order, normalised to [-1, 1].

    Bits s e1 e0 m: sign s (0b1000); exponent field e = (e1 e0); mantissa m. bitsandbytes assigns
    e = 0 to subnormals, m · 0.0625, and e = 1, 2, 3 to (1 + m/2) · 2^(4-e), i.e. 8|12, 4|6, 2|3.
    The table is divided by its largest magnitude (12) in float32.

    Returns: (16,) float32, index = the 4-bit code (not sorted; codes 0 and 8 are both +0.0).
    """
    values = []
    for code in range(16):
        e, m = (code >> 1) & 0b11, code & 0b1
        magnitude = m * 0.0625 if e == 0 else (1.0 + 0.5 * m) * 2.0 ** (4 - e)
        # bitsandbytes writes the zero of code 8 as the integer -0, i.e. +0.0: keep its bits.
        values.append(-magnitude if (code & 0b1000 and magnitude) else magnitude)
    table = np.array(values, dtype=np.float32)
    return table / np.abs(table).max()


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' "dynamic" 8-bit map (Dettmers 2015, 8-bit approximations): a decimal exponent
    10^(i - (max_exponent_bits-1)) for i = 0..max_exponent_bits-1 times the midpoints of a linear
    fraction grid on [0.1, 1] with 2^i + 1 points (2^(i+1) + 1 unsigned), both signs, plus 0 and 1.
    The products are float32 (the scale is rounded to float32 first, as a torch scalar is).

    Returns: (256,) float32, sorted ascending.
    """
    data = []
    non_sign_bits = total_bits - 1
    additional = 2 ** (non_sign_bits - max_exponent_bits) - 1
    last_scale = None
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else \
            2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        bounds = linspace_float32(0.1, 1.0, items)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        last_scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))
        data.append(last_scale * means)
        if signed:
            data.append(-last_scale * means)
    if additional > 0:
        bounds = linspace_float32(0.1, 1.0, additional + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        data.append(last_scale * means)
        if signed:
            data.append(-last_scale * means)
    data.append(np.array([0.0, 1.0], dtype=np.float32))
    values = np.concatenate(data).astype(np.float32)
    if values.size > 2 ** total_bits:
        raise ValueError(f"create_dynamic_map produced {values.size} values for total_bits={total_bits}")
    values = np.concatenate([values, np.zeros(256 - values.size, dtype=np.float32)])
    return np.sort(values)


_CACHE: dict = {}


def get_4bit_code(quant_type: str) -> np.ndarray:
    """The (16,) float32 codebook of ``quant_type`` ("nf4" or "fp4"), index = 4-bit code. Read-only."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    key = ("4bit", quant_type)
    if key not in _CACHE:
        code = create_normal_map() if quant_type == "nf4" else create_fp4_map()
        code.setflags(write=False)
        _CACHE[key] = code
    return _CACHE[key]


def get_dynamic_map() -> np.ndarray:
    """The (256,) float32 signed dynamic map (double quantisation, 8-bit blockwise). Read-only."""
    if "dynamic" not in _CACHE:
        code = create_dynamic_map()
        code.setflags(write=False)
        _CACHE["dynamic"] = code
    return _CACHE["dynamic"]


def sorted_4bit_code(quant_type: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted values (16,), order (16,) uint8, midpoints (15,)) of a 4-bit codebook.

    ``order[k]`` is the code of the k-th smallest value. The sort is stable, so FP4's two zeros keep
    code order (+0 = code 0 first, then -0 = code 8), which is the order bitsandbytes' CPU backend
    gets from torch.argsort. Midpoints are (v[k] + v[k+1]) / 2 in float32.
    """
    code = get_4bit_code(quant_type)
    order = np.argsort(code, kind="stable")
    values = code[order]
    midpoints = (values[:-1] + values[1:]) / np.float32(2)
    return values, order.astype(np.uint8), midpoints


def max_gap(code: np.ndarray) -> float:
    """The largest distance between neighbouring values of a codebook (float64)."""
    v = np.sort(np.asarray(code, dtype=np.float64))
    return float(np.max(np.diff(v)))
