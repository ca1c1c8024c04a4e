"""CuPy kernels: 4-bit dequantisation on the GPU (one thread per output element), and its NumPy twin.

Shapes: packed (ceil(n/2),) uint8; absmax (nb,) float32; code (16,) float32; out (n,) float32.
out[i] = code[nibble_i] · absmax[i / blocksize], nibble_i the high nibble of byte i/2 for even i,
the low nibble for odd i (bitsandbytes' packing). ``__fmul_rn`` forbids fusing the product into
anything else, so every value is the same correctly rounded float32 product as on the CPU: the
NumPy twin (the same formula, vectorised) runs it on the gpu-emulated device and is checked equal
bit for bit on a real GPU (benchmarks/gpu_kernels.py).
"""
from __future__ import annotations

import numpy as np

from ..backend import get_xp, to_xp
from ..emulated import register_twin
from .codebooks import get_4bit_code

DEQUANT_4BIT = dict(
    in_params="raw uint8 packed, raw float32 absmax, raw float32 code, int64 blocksize",
    out_params="float32 out",
    operation="""
    const unsigned char byte = packed[i >> 1];
    const int q = (i & 1) ? (byte & 0x0F) : (byte >> 4);
    out = __fmul_rn(code[q], absmax[i / blocksize]);
    """,
    name="spectral_peft_dequantize_4bit",
)


def dequantize_4bit_twin(packed, absmax, code, blocksize, size: int):
    """The kernel's formula on NumPy arrays: -> (size,) float32."""
    i = np.arange(size)
    byte = packed[i >> 1]
    q = np.where(i & 1, byte & 0x0F, byte >> 4)
    return code[q] * absmax[i // int(blocksize)]  # float32 × float32, rounded once


def _dequantize_example(rng):
    """Valid arguments (NumPy) for the kernel: an odd n and a partial last block."""
    n, blocksize = 1001, 64
    packed = rng.integers(0, 256, (n + 1) // 2, dtype=np.uint8)
    absmax = rng.uniform(0.01, 4.0, -(-n // blocksize)).astype(np.float32)
    return (packed, absmax, get_4bit_code("nf4"), blocksize), n


register_twin(DEQUANT_4BIT["name"], "ElementwiseKernel", dequantize_4bit_twin, _dequantize_example, DEQUANT_4BIT)

_KERNELS: dict = {}
_CODES: dict = {}


def _kernel(xp):
    """The compiled (cached) kernel of the namespace ``xp`` (cupy, or the emulated one)."""
    if id(xp) not in _KERNELS:
        _KERNELS[id(xp)] = (xp, xp.ElementwiseKernel(**DEQUANT_4BIT))
    return _KERNELS[id(xp)][1]


def _device_code(xp, quant_type: str):
    """The (16,) float32 code book on the device, copied once per namespace and quant type."""
    key = (id(xp), quant_type)
    if key not in _CODES:
        _CODES[key] = (xp, to_xp(get_4bit_code(quant_type), xp))
    return _CODES[key][1]


def dequantize_4bit_cupy(packed, absmax, blocksize: int, quant_type: str, n: int):
    """(ceil(n/2),) uint8 codes + (nb,) float32 absmax -> (n,) float32 on the GPU."""
    xp = get_xp(packed)
    out = xp.empty(n, dtype=xp.float32)
    _kernel(xp)(packed.reshape(-1), absmax.astype(xp.float32, copy=False), _device_code(xp, quant_type),
                blocksize, out)
    return out
