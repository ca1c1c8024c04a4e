"""Live parity with bitsandbytes (its reference PyTorch backend): codebooks, 4-bit codes, absmax and
dequantised values bit for bit, double quantisation, 8-bit blockwise and int8 vector-wise
quantisation. The same facts for fixed tensors are proven without bitsandbytes in
test_quant_golden.py (a trace bitsandbytes wrote); this file checks them on wider cases, and
catches a bitsandbytes release that changes them."""
import numpy as np
import pytest

from spectral_peft.quant import (create_dynamic_map, dequantize_4bit, dequantize_blockwise, double_quantize,
                                 get_4bit_code, int8_vectorwise_dequant, int8_vectorwise_quant, quantize_4bit,
                                 quantize_blockwise)
from spectral_peft.quant import blockwise as B
from spectral_peft.quant.codebooks import sorted_4bit_code
from tests._quant import assert_codes_match_or_nearer, bits, offset_ulps

torch = pytest.importorskip("torch", reason="torch: bitsandbytes' tensors (the live bitsandbytes parity peer)")
F = pytest.importorskip("bitsandbytes.functional",
                        reason="bitsandbytes: the live 4-bit/8-bit parity peer (test_quant_golden.py covers its absence)")


def bnb_dequantize_4bit_reference(packed, absmax, blocksize, quant_type, shape):
    """bitsandbytes' reference (default, pure-PyTorch) 4-bit dequantisation, uncompiled. Its native
    CPU kernel indexes blocks per row and disagrees with the row-major format quantize_4bit writes
    when the last dimension is not a multiple of the blocksize, so parity is with this one."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    p = torch.from_numpy(np.ascontiguousarray(packed).reshape(-1))
    return fn(p, torch.from_numpy(absmax), _get_4bit_code(quant_type, p.device), blocksize, shape,
              torch.float32).numpy()


# --- codebooks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_codebooks_equal_bitsandbytes(quant_type):
    assert np.array_equal(bits(get_4bit_code(quant_type)), bits(F.get_4bit_type(quant_type, "cpu").numpy()))


def test_dynamic_map_construction_equals_bitsandbytes():
    assert np.array_equal(bits(create_dynamic_map()), bits(F.create_dynamic_map().numpy()))


def test_sorted_order_matches_torch_argsort():
    for qt in ("nf4", "fp4"):
        _, order, _ = sorted_4bit_code(qt)
        ref = torch.argsort(torch.from_numpy(np.array(get_4bit_code(qt)))).numpy()
        assert np.array_equal(order, ref), qt


# --- 4-bit parity with bitsandbytes ------------------------------------------------------------------
def _cases():
    rng = np.random.default_rng(1234)
    cases = []
    for shape in [(1,), (7,), (64,), (65,), (33, 65), (128, 96), (3, 1000), (256, 256)]:
        cases.append((f"normal{shape}", rng.standard_normal(shape)))
    z = rng.standard_normal((10, 64))
    z[2] = 0.0  # an all-zero block
    z[5] = 0.375  # a constant block
    z[7] = -2.5
    cases.append(("zero_and_constant_blocks", z))
    cases.append(("huge", rng.standard_normal((5, 64)) * 1e35))
    cases.append(("tiny", rng.standard_normal((5, 64)) * 1e-35))
    cases.append(("subnormal", rng.standard_normal((2, 64)) * 1e-40))
    cases.append(("mixed_scales", rng.standard_normal((16, 64)) * (10.0 ** rng.integers(-20, 20, (16, 1)))))
    return cases


def _midpoint_case(quant_type, blocksize):
    """Blocks holding 1.0 (so absmax = 1 and s = x exactly) and every midpoint between codes,
    plus the float32 neighbours of each midpoint."""
    _, _, mids = sorted_4bit_code(quant_type)
    vals = np.concatenate([mids, np.nextafter(mids, 2), np.nextafter(mids, -2), -mids])
    pad = (-(vals.size + 1)) % blocksize
    return np.concatenate([[1.0], vals, np.zeros(pad)]).astype(np.float32)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_quantize_4bit_bit_identical_to_bitsandbytes(quant_type, blocksize):
    cases = _cases() + [("midpoints", _midpoint_case(quant_type, blocksize))]
    for name, x in cases:
        x = np.asarray(x, dtype=np.float32)
        pb, sb = F.quantize_4bit(torch.from_numpy(x), blocksize=blocksize, quant_type=quant_type)
        for fast in (True, False):
            p, s = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, fast=fast)
            where = f"{name} {quant_type} b={blocksize} fast={fast}"
            assert p.shape == tuple(pb.shape) and p.dtype == np.uint8, where
            assert np.array_equal(p, pb.numpy()), f"{where}: {(p != pb.numpy()).sum()} packed bytes differ"
            assert np.array_equal(bits(s.absmax), bits(sb.absmax.numpy())), f"{where}: absmax differs"
            d = dequantize_4bit(p, s, fast=fast)
            ref = bnb_dequantize_4bit_reference(pb.numpy(), sb.absmax.numpy(), blocksize, quant_type, x.shape)
            assert d.shape == x.shape
            assert np.array_equal(bits(d), bits(ref)), f"{where}: dequantised values differ"


@pytest.mark.parametrize("shape", [(256, 256), (1000, 64), (96, 160)])
def test_double_quantisation_matches_bitsandbytes(shape):
    """Given bitsandbytes' offset (torch's float32 mean, whose summation order is torch's own), the
    nested absmax is bit-identical and the nested codes equal except where bitsandbytes' CPU binary
    search (float32 z - code[0] bucketing) misses the nearest code; there ours is provably nearer."""
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    pb, sb = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4", compress_statistics=True)
    p, s = quantize_4bit(x, 64, "nf4", compress_statistics=True)
    assert np.array_equal(p, pb.numpy())
    bnb_offset = np.float32(sb.offset.item())
    ulps = offset_ulps(s.offset, bnb_offset)
    assert ulps <= 4, f"offset {s.offset!r} vs bitsandbytes {bnb_offset!r}: {ulps} ulps"
    _, plain = quantize_4bit(x, 64, "nf4")
    s = double_quantize(plain, offset=bnb_offset)
    assert s.state2.blocksize == 256 and s.absmax.dtype == np.uint8
    assert np.array_equal(bits(s.state2.absmax), bits(sb.state2.absmax.numpy()))
    assert_codes_match_or_nearer(s.absmax, sb.absmax.numpy(), plain.absmax - bnb_offset, s.state2.absmax, 256)
    # dequantisation of the nested state, given the same codes, is bit-identical
    s.absmax = sb.absmax.numpy()
    ref_absmax = F.dequantize_blockwise(sb.absmax, sb.state2).numpy() + sb.offset.numpy()
    assert np.array_equal(bits(B.dequantize_absmax(s)), bits(ref_absmax))
    ref = bnb_dequantize_4bit_reference(pb.numpy(), ref_absmax, 64, "nf4", shape)
    assert np.array_equal(bits(dequantize_4bit(p, s)), bits(ref))


def test_quantize_blockwise_8bit_matches_bitsandbytes():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(3000), np.zeros(256), rng.uniform(-1, 1, 1000) * 1e-3]).astype(np.float32)
    qb, sb = F.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    q, s = quantize_blockwise(x, blocksize=256)
    assert np.array_equal(bits(s.absmax), bits(sb.absmax.numpy()))
    # 256 exact zeros and 1000 values within 1e-3 of zero: the region where bitsandbytes is coarse
    assert_codes_match_or_nearer(q, qb.numpy(), x, s.absmax, 256, max_fraction=0.3)
    same = q == qb.numpy()
    d = dequantize_blockwise(q, s)
    ref = F.dequantize_blockwise(qb, sb).numpy()
    assert np.array_equal(bits(d[same]), bits(ref[same]))


def test_int8_vectorwise_matches_bitsandbytes():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((9, 33)) * rng.uniform(0.01, 100, (9, 1))).astype(np.float32)
    x[3] = 0.0
    qb, statsb, _ = F.int8_vectorwise_quant(torch.from_numpy(x.copy()))
    q, stats = int8_vectorwise_quant(x)
    keep = np.any(x != 0, axis=1)  # bitsandbytes leaves a zero row undefined (0·inf)
    assert np.array_equal(q[keep], qb.numpy()[keep]) and np.all(q[~keep] == 0)
    assert np.array_equal(bits(stats), bits(statsb.numpy()))
    d = int8_vectorwise_dequant(q, stats)
    assert np.array_equal(bits(d[keep]), bits(F.int8_vectorwise_dequant(qb, statsb).numpy()[keep]))
