"""Live parity with bitsandbytes (its reference PyTorch backend): codebooks, 4-bit codes, absmax and
dequantised values bit for bit, double quantisation, 8-bit blockwise and int8 vector-wise
quantisation. The same facts for fixed tensors are proven without bitsandbytes in
test_quant_golden.py (a trace bitsandbytes wrote); this file checks them on wider cases, and
catches a bitsandbytes release that changes them."""
import numpy as np
import pytest

from spectral_peft.quant import (create_dynamic_map, dequantize_4bit, dequantize_blockwise, double_quantize,
                                 get_4bit_code, int8_vectorwise_dequant, int8_vectorwise_quant, quantize_4bit,
                                 quantize_blockwise, torch_mean_float32)
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
    """The default (match="nearest"), given bitsandbytes' offset (torch's float32 mean): the nested
    absmax is bit-identical and the nested codes equal except where bitsandbytes' 65536-point grid
    picks another code; there ours is provably nearer. (match="bitsandbytes" is bit-identical:
    test_double_quantisation_bitsandbytes_match_sweep.)"""
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


# --- match="bitsandbytes": double quantisation bit for bit ------------------------------------------
def _bnb_nested_dequantize(pb, sb):
    """bitsandbytes' dequantised weight of a double-quantised state: its absmax
    F.dequantize_blockwise(state2) + offset, then its reference 4-bit dequantisation."""
    absmax = (F.dequantize_blockwise(sb.absmax, sb.state2) + sb.offset).numpy()
    return bnb_dequantize_4bit_reference(pb.numpy(), absmax, sb.blocksize, sb.quant_type, tuple(sb.shape))


def _pattern(kind, n, blocksize, rng):
    """(n,) float32 weights of one value pattern, whole 4-bit blocks of ``blocksize``."""
    nb = -(-n // blocksize)

    def per_block(v):  # (nb,) -> (n,)
        return np.repeat(v, blocksize)[:n]

    x = rng.standard_normal(n)
    if kind == "constant_blocks":  # every element of a block equal: absmax = |value|
        x = per_block(rng.standard_normal(nb))
    elif kind == "zero_blocks":  # about a third of the blocks all zero (absmax 0 below the mean)
        x = np.where(per_block(rng.random(nb) < 0.35), 0.0, x)
    elif kind == "huge":
        x = x * 1e30
    elif kind == "tiny":
        x = x * 1e-30
    elif kind == "mixed_scales":  # block scales over 12 decades
        x = x * per_block(10.0 ** rng.uniform(-6, 6, nb))
    return x.astype(np.float32)


PATTERNS = ("normal", "constant_blocks", "zero_blocks", "huge", "tiny", "mixed_scales")


@pytest.mark.parametrize("blocksize", [64, 128, 256, 4096])
def test_double_quantisation_bitsandbytes_match_sweep(blocksize):
    """match="bitsandbytes" equals bitsandbytes' own quantize_4bit(compress_statistics=True) bit for
    bit: the nested 8-bit codes, the nested absmax, the offset and the dequantised weights, over
    sizes with partial 4-bit blocks and partial 256-block nested groups, and six value patterns."""
    rng = np.random.default_rng(blocksize)
    nbs = [1, 2, 7, 255, 256, 257, 600] if blocksize < 4096 else [1, 3, 40, 300]
    for nb in nbs:
        for kind in PATTERNS:
            n = nb * blocksize - int(rng.integers(0, blocksize // 2))  # usually a partial last block
            x = _pattern(kind, n, blocksize, rng)
            qt = "nf4" if nb % 2 else "fp4"
            pb, sb = F.quantize_4bit(torch.from_numpy(x), blocksize=blocksize, quant_type=qt, compress_statistics=True)
            p, s = quantize_4bit(x, blocksize, qt, compress_statistics=True, match="bitsandbytes")
            where = f"{kind} n={n} b={blocksize} {qt}"
            assert np.array_equal(p, pb.numpy()), where
            assert s.absmax.dtype == np.uint8 and np.array_equal(s.absmax, sb.absmax.numpy()), f"{where}: nested codes"
            assert np.array_equal(bits(s.state2.absmax), bits(sb.state2.absmax.numpy())), f"{where}: nested absmax"
            assert bits(s.offset) == bits(sb.offset.numpy()), f"{where}: offset {s.offset!r} vs {sb.offset.item()!r}"
            assert np.array_equal(bits(dequantize_4bit(p, s)), bits(_bnb_nested_dequantize(pb, sb))), \
                f"{where}: dequantised weights"


def test_double_quantisation_default_stays_nearest():
    """The default keeps the exact-nearest code: on a case where the two rules differ (given the
    same offset), every differing nested code of the default is at least as near to the true
    centred absmax as bitsandbytes', some strictly, and its dequantised absmax is nearer overall."""
    x = np.random.default_rng(2).standard_normal((256, 256)).astype(np.float32)
    _, plain = quantize_4bit(x, 64, "nf4")
    offset = torch_mean_float32(plain.absmax)
    near = double_quantize(plain, offset=offset)
    theirs = double_quantize(plain, offset=offset, match="bitsandbytes")
    assert np.array_equal(bits(near.state2.absmax), bits(theirs.state2.absmax))
    diff = np.nonzero(near.absmax != theirs.absmax)[0]
    assert diff.size > 0, "the rules agree here; the case proves nothing"
    # distances in float64 from the true normalised centred absmax to each rule's code value
    code = create_dynamic_map().astype(np.float64)
    target = (plain.absmax[diff].astype(np.float64) - np.float64(offset)) / np.float64(near.state2.absmax[diff // 256])
    d_near = np.abs(target - code[near.absmax[diff]])
    d_theirs = np.abs(target - code[theirs.absmax[diff]])
    assert np.all(d_near < d_theirs), (d_near, d_theirs)
    true = plain.absmax[diff].astype(np.float64)
    err_near = np.abs(B.dequantize_absmax(near)[diff].astype(np.float64) - true)
    err_theirs = np.abs(B.dequantize_absmax(theirs)[diff].astype(np.float64) - true)
    assert np.all(err_near <= err_theirs) and err_near.sum() < err_theirs.sum()
    # the default of quantize_4bit is this rule
    _, s = quantize_4bit(x, 64, "nf4", compress_statistics=True)
    assert np.array_equal(s.absmax, double_quantize(plain).absmax)


def test_quantize_blockwise_8bit_bitsandbytes_match():
    """8-bit blockwise with match="bitsandbytes": codes and absmax equal bitsandbytes', including the
    exact zeros and the values near zero where the default picks finer codes."""
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(3000), np.zeros(256), rng.uniform(-1, 1, 1000) * 1e-3,
                        rng.standard_normal(77) * 1e20]).astype(np.float32)
    for blocksize in (64, 256, 4096):
        qb, sb = F.quantize_blockwise(torch.from_numpy(x), blocksize=blocksize)
        q, s = quantize_blockwise(x, blocksize=blocksize, match="bitsandbytes")
        assert np.array_equal(q, qb.numpy()), f"b={blocksize}: {(q != qb.numpy()).sum()} codes differ"
        assert np.array_equal(bits(s.absmax), bits(sb.absmax.numpy()))
        assert np.array_equal(bits(dequantize_blockwise(q, s)), bits(F.dequantize_blockwise(qb, sb).numpy()))


def test_torch_mean_float32_equals_torch():
    """torch_mean_float32 is torch.mean of a float32 vector bit for bit: sizes below one vector,
    around the cascade's run lengths, and above ATen's parallel grain with two threads."""
    rng = np.random.default_rng(5)
    sizes = [1, 2, 3, 7, 8, 9, 31, 33, 64, 255, 257, 1000, 4097, 32768, 32769, 70001]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n in sizes:
            x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)).astype(np.float32)
            ref = torch.from_numpy(x).mean().numpy()
            assert bits(torch_mean_float32(x, threads=2)) == bits(ref), f"n={n}"
    finally:
        torch.set_num_threads(threads)


def test_match_refused_by_name():
    x = np.ones((4, 64), dtype=np.float32)
    with pytest.raises(ValueError, match="match must be one of .*'bitsandbytes'.*got 'bnb'"):
        quantize_4bit(x, compress_statistics=True, match="bnb")
    with pytest.raises(ValueError, match="match must be one of"):
        quantize_4bit(x, match=None)
    with pytest.raises(ValueError, match="match must be one of"):
        double_quantize(quantize_4bit(x)[1], match="exact")
    with pytest.raises(ValueError, match="match must be one of"):
        quantize_blockwise(x, blocksize=64, match="Bitsandbytes")


def test_match_flows_through_linear4bit_and_quantize_model():
    """Linear4bit.from_linear and quantize_model pass match on: their nested state is bitsandbytes'."""
    from spectral_peft.module import Linear, Module
    from spectral_peft.quant import Linear4bit, quantize_model

    W = np.random.default_rng(9).standard_normal((96, 128)).astype(np.float32)
    _, sb = F.quantize_4bit(torch.from_numpy(W), blocksize=64, quant_type="nf4", compress_statistics=True)
    layer = Linear4bit.from_linear(Linear(W.copy()), match="bitsandbytes")
    assert np.array_equal(layer.quant_state.absmax, sb.absmax.numpy())
    assert bits(layer.quant_state.offset) == bits(sb.offset.numpy())
    model = Module()
    model.proj = Linear(W.copy())
    assert quantize_model(model, match="bitsandbytes") == ["proj"]
    assert np.array_equal(model.proj.quant_state.absmax, sb.absmax.numpy())
    other = Module()
    other.proj = Linear(W.copy())
    with pytest.raises(ValueError, match="match must be one of"):
        quantize_model(other, match="bnb")
    assert isinstance(other.proj, Linear) and not isinstance(other.proj, Linear4bit)  # left untouched
