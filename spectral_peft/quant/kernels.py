"""CuPy kernels: 4-bit dequantisation on the GPU (one thread per output element).

Shapes: packed (ceil(n/2),) uint8; absmax (nb,) float32; code (16,) float32; out (n,) float32.
out[i] = code[nibble_i] · absmax[i / blocksize], nibble_i the high nibble of byte i/2 for even i,
the low nibble for odd i (bitsandbytes' packing). ``__fmul_rn`` forbids fusing the product into
anything else, so every value is the same correctly rounded float32 product as on the CPU.
Imported only when a CuPy array is dequantised.
"""
from __future__ import annotations

import cupy

from .codebooks import get_4bit_code

_DEQUANT_4BIT = cupy.ElementwiseKernel(
    "raw uint8 packed, raw float32 absmax, raw float32 code, int64 blocksize",
    "float32 out",
    """
    const unsigned char byte = packed[i >> 1];
    const int q = (i & 1) ? (byte & 0x0F) : (byte >> 4);
    out = __fmul_rn(code[q], absmax[i / blocksize]);
    """,
    "spectral_peft_dequantize_4bit",
)


def dequantize_4bit_cupy(packed, absmax, blocksize: int, quant_type: str, n: int):
    """(ceil(n/2),) uint8 codes + (nb,) float32 absmax -> (n,) float32 on the GPU."""
    code = cupy.asarray(get_4bit_code(quant_type))
    out = cupy.empty(n, dtype=cupy.float32)
    _DEQUANT_4BIT(packed.reshape(-1), absmax.astype(cupy.float32, copy=False), code, blocksize, out)
    return out
