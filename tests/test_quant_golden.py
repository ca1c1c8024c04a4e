"""The engine's 4-bit quantisation against bitsandbytes' own output, stored in
tests/golden/bnb_4bit.safetensors by tests/golden/make_golden.py (bitsandbytes 0.50.2): parity
holds without bitsandbytes installed, and a later bitsandbytes that changes is caught by the live
tests in test_quant_bnb.py rather than silently redefining what is right."""
import json
import os

import numpy as np
import pytest
from safetensors import safe_open

from tests._quant import assert_codes_match_or_nearer, bits, offset_ulps
from spectral_peft.quant import (create_dynamic_map, dequantize_4bit, dequantize_absmax, double_quantize,
                                 get_4bit_code, quantize_4bit)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "bnb_4bit.safetensors")


@pytest.fixture(scope="module")
def golden():
    with safe_open(GOLDEN, "np") as f:
        meta = f.metadata()
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    return arrays, {k: (json.loads(v) if k in ("blocksize", "nested_blocksize") else v) for k, v in meta.items()}


def test_golden_file_records_its_peer(golden):
    _, meta = golden
    assert meta["bitsandbytes"] == "0.50.2" and meta["torch"].startswith("2.")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_codebooks_equal_bitsandbytes(golden, quant_type):
    arrays, _ = golden
    assert np.array_equal(bits(get_4bit_code(quant_type)), bits(arrays[f"code.{quant_type}"]))


def test_dynamic_map_equals_bitsandbytes(golden):
    arrays, _ = golden
    assert np.array_equal(bits(create_dynamic_map()), bits(arrays["code.dynamic"]))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("tensor", ["a", "b"])
@pytest.mark.parametrize("fast", [True, False])
def test_codes_absmax_and_dequant_bit_identical(golden, quant_type, tensor, fast):
    """a: (16, 64) with an all-zero and a constant block; b: (5, 77), odd with a partial block."""
    arrays, meta = golden
    x = arrays[f"x.{tensor}"]
    key = f"{quant_type}.{tensor}"
    packed, state = quantize_4bit(x, meta["blocksize"], quant_type, fast=fast)
    assert packed.shape == arrays[f"{key}.packed"].shape and packed.dtype == np.uint8
    diff = int((packed != arrays[f"{key}.packed"]).sum())
    assert diff == 0, f"{key}: {diff} packed bytes differ from bitsandbytes"
    assert np.array_equal(bits(state.absmax), bits(arrays[f"{key}.absmax"])), f"{key}: absmax"
    deq = dequantize_4bit(packed, state, fast=fast)
    assert deq.shape == x.shape
    assert np.array_equal(bits(deq), bits(arrays[f"{key}.dequant"])), f"{key}: dequantised values"


def test_nested_state_equals_bitsandbytes(golden):
    """Double quantisation of a (64, 160) tensor at blocksize 32 (320 absmax, two nested blocks).
    The offset is a float32 mean whose summation order is torch's own: within 4 ulps. Given that
    offset, the nested absmax is bit-identical and the codes equal or provably nearer (see
    _quant.assert_codes_match_or_nearer); given bitsandbytes' codes, the absmax and the values
    they dequantise to are bit-identical."""
    arrays, meta = golden
    x, b = arrays["x.c"], meta["nested_blocksize"]
    packed, nested = quantize_4bit(x, b, "nf4", compress_statistics=True)
    assert np.array_equal(packed, arrays["nested.packed"])
    offset = arrays["nested.offset"][0]
    assert offset_ulps(nested.offset, offset) <= 4, f"offset {nested.offset!r} vs bitsandbytes {offset!r}"
    _, plain = quantize_4bit(x, b, "nf4")
    state = double_quantize(plain, offset=offset)
    assert state.state2.blocksize == 256 and state.absmax.dtype == np.uint8
    assert np.array_equal(bits(state.state2.absmax), bits(arrays["nested.state2_absmax"]))
    assert_codes_match_or_nearer(state.absmax, arrays["nested.absmax_codes"], plain.absmax - offset,
                                 state.state2.absmax, 256)
    state.absmax = arrays["nested.absmax_codes"].copy()
    assert np.array_equal(bits(dequantize_absmax(state)), bits(arrays["nested.absmax"]))
    assert np.array_equal(bits(dequantize_4bit(packed, state)), bits(arrays["nested.dequant"]))
