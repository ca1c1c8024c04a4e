"""Quantisation: codebooks, bit parity with bitsandbytes (its reference PyTorch backend), error
bounds, packing, fast paths equal to the canonical code, Linear4bit under adapters, bad input."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spectral_peft.backend import get_backend, to_device, to_host
from spectral_peft.module import Linear, Module
from spectral_peft.quant import (Linear4bit, bits_per_parameter, create_dynamic_map, dequantize_4bit,
                                 dequantize_blockwise, double_quantize, frozen_weight_bytes, get_4bit_code,
                                 int8_vectorwise_dequant, int8_vectorwise_quant, pack_4bit, quantize_4bit,
                                 quantize_blockwise, quantize_model, unpack_4bit)
from spectral_peft.quant import blockwise as B
from spectral_peft.quant.codebooks import (FP4_PUBLISHED_UNNORMALISED, NF4_PUBLISHED, max_gap,
                                           sorted_4bit_code)
from spectral_peft.testing import assert_close, check_module_gradients

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")


def bits(a):
    """The raw float32 bit patterns, so -0.0 != +0.0 and NaN payloads count."""
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32)).view(np.uint32)


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
def test_nf4_construction_equals_published_values_and_bitsandbytes():
    code = get_4bit_code("nf4")
    assert np.array_equal(bits(code), bits(np.array(NF4_PUBLISHED, dtype=np.float32)))
    assert np.array_equal(bits(code), bits(F.get_4bit_type("nf4", "cpu").numpy()))
    assert code[7] == 0.0 and code[0] == -1.0 and code[15] == 1.0
    assert np.all(np.diff(code) > 0)


def test_fp4_construction_equals_published_values_and_bitsandbytes():
    code = get_4bit_code("fp4")
    published = np.array(FP4_PUBLISHED_UNNORMALISED, dtype=np.float32) / np.float32(12)
    assert np.array_equal(code, published)
    assert np.array_equal(bits(code), bits(F.get_4bit_type("fp4", "cpu").numpy()))
    assert np.all(code[8:][1:] == -code[:8][1:])  # bit 0b1000 is the sign


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


def test_exact_midpoint_goes_to_lower_code():
    _, order, mids = sorted_4bit_code("nf4")
    x = np.zeros(64, dtype=np.float32)
    x[0] = 1.0
    x[1] = mids[10]  # exactly between sorted codes 10 and 11
    p, _ = quantize_4bit(x, 64, "nf4")
    q = unpack_4bit(p.reshape(-1), 64)
    assert q[1] == order[10] == 10


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
    ulps = abs(int(np.float32(s.offset).view(np.int32)) - int(bnb_offset.view(np.int32)))
    assert ulps <= 4, f"offset {s.offset!r} vs bitsandbytes {bnb_offset!r}: {ulps} ulps"
    _, plain = quantize_4bit(x, 64, "nf4")
    s = double_quantize(plain, offset=bnb_offset)
    assert s.state2.blocksize == 256 and s.absmax.dtype == np.uint8
    assert np.array_equal(bits(s.state2.absmax), bits(sb.state2.absmax.numpy()))
    _assert_codes_match_or_nearer(s.absmax, sb.absmax.numpy(), plain.absmax - bnb_offset, s.state2.absmax, 256)
    # dequantisation of the nested state, given the same codes, is bit-identical
    s.absmax = sb.absmax.numpy()
    ref_absmax = F.dequantize_blockwise(sb.absmax, sb.state2).numpy() + sb.offset.numpy()
    assert np.array_equal(bits(B.dequantize_absmax(s)), bits(ref_absmax))
    ref = bnb_dequantize_4bit_reference(pb.numpy(), ref_absmax, 64, "nf4", shape)
    assert np.array_equal(bits(dequantize_4bit(p, s)), bits(ref))


def _assert_codes_match_or_nearer(ours, theirs, values, absmax, blocksize, max_fraction=0.01):
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


def test_quantize_blockwise_8bit_matches_bitsandbytes():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(3000), np.zeros(256), rng.uniform(-1, 1, 1000) * 1e-3]).astype(np.float32)
    qb, sb = F.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    q, s = quantize_blockwise(x, blocksize=256)
    assert np.array_equal(bits(s.absmax), bits(sb.absmax.numpy()))
    # 256 exact zeros and 1000 values within 1e-3 of zero: the region where bitsandbytes is coarse
    _assert_codes_match_or_nearer(q, qb.numpy(), x, s.absmax, 256, max_fraction=0.3)
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


# --- properties (Hypothesis) ----------------------------------------------------------------------
_floats = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@given(data=st.data(), quant_type=st.sampled_from(["nf4", "fp4"]), blocksize=st.sampled_from([32, 64, 128]),
       nested=st.booleans())
def test_roundtrip_error_bound_and_code_range(data, quant_type, blocksize, nested):
    n = data.draw(st.integers(1, 300), label="n")
    x = np.array(data.draw(st.lists(_floats, min_size=n, max_size=n)), dtype=np.float32)
    p, s = quantize_4bit(x, blocksize, quant_type, compress_statistics=nested)
    q = unpack_4bit(p.reshape(-1), n)
    assert q.dtype == np.uint8 and q.max() <= 15
    d = dequantize_4bit(p, s).astype(np.float64)
    _, plain = quantize_4bit(x, blocksize, quant_type)
    absmax = plain.absmax.astype(np.float64)[np.arange(n) // blocksize]  # (n,)
    half_gap = max_gap(get_4bit_code(quant_type)) / 2
    bound = half_gap * absmax * (1 + 1e-6) + 1e-30
    if nested:
        # each absmax is off by at most half a dynamic-map gap times its 256-block's absmax (+ rounding)
        code8 = create_dynamic_map().astype(np.float64)
        c = s.state2.absmax.astype(np.float64)[np.arange(plain.absmax.size) // 256]
        da = (max_gap(code8) / 2 * c + 1e-6 * np.abs(plain.absmax))[np.arange(n) // blocksize]
        bound = bound + da  # |code| <= 1
    err = np.abs(d - x.astype(np.float64))
    assert np.all(err <= bound), f"max excess {(err - bound).max()}"


@given(q=st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0))
def test_pack_unpack_roundtrip(q):
    q = np.array(q, dtype=np.uint8)
    p = pack_4bit(q)
    assert p.size == q.size // 2
    assert np.array_equal(p >> 4, q[0::2])  # first element in the high nibble
    assert np.array_equal(unpack_4bit(p, q.size), q)


@given(data=st.data(), quant_type=st.sampled_from(["nf4", "fp4"]), blocksize=st.sampled_from([32, 64, 4096]))
def test_fast_paths_equal_reference(data, quant_type, blocksize):
    n = data.draw(st.integers(1, 2000), label="n")
    seed = data.draw(st.integers(0, 2**31), label="seed")
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    pf, sf = quantize_4bit(x, blocksize, quant_type, fast=True)
    pr, sr = quantize_4bit(x, blocksize, quant_type, fast=False)
    assert np.array_equal(pf, pr) and np.array_equal(bits(sf.absmax), bits(sr.absmax))
    assert np.array_equal(bits(dequantize_4bit(pf, sf, fast=True)), bits(dequantize_4bit(pr, sr, fast=False)))


@pytest.mark.parametrize("threads", [1, 2])
def test_fast_paths_equal_reference_across_chunks(monkeypatch, threads):
    monkeypatch.setattr(B, "FAST_PATH_THREADS", threads)
    monkeypatch.setattr(B, "PARALLEL_MIN_CHUNKS", 1)  # so that 3 chunks do run on 2 threads
    x = np.random.default_rng(11).standard_normal(3 * B.CHUNK + 100).astype(np.float32)
    pf, sf = quantize_4bit(x, 64, "nf4", fast=True)
    pr, sr = quantize_4bit(x, 64, "nf4", fast=False)
    assert np.array_equal(pf, pr)
    assert np.array_equal(bits(dequantize_4bit(pf, sf, fast=True)), bits(dequantize_4bit(pr, sr, fast=False)))


# --- memory accounting ---------------------------------------------------------------------------------
def test_bits_per_parameter():
    assert bits_per_parameter(64) == 4.5
    assert abs(bits_per_parameter(64, True) - 4.127) < 1e-3
    W = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
    plain = Linear4bit.from_linear(Linear(W), compress_statistics=False)
    nested = Linear4bit.from_linear(Linear(W), compress_statistics=True)
    assert plain.weight_bytes() == 512 * 512 // 2 + 4 * 512 * 512 // 64
    assert plain.bits_per_parameter() == 4.5
    # 4 bits + 8/64 + 32/(64·256) + the offset's 32 bits spread over 512² weights
    assert abs(nested.bits_per_parameter() - (4 + 8 / 64 + 32 / (64 * 256) + 32 / 512**2)) < 1e-12


# --- the quantised linear --------------------------------------------------------------------------------
def _dense_twin(layer: Linear4bit) -> Linear:
    lin = Linear(layer.effective_weight().copy(), None if "bias" not in layer.params else layer.params["bias"].copy())
    lin.freeze("weight")
    return lin


def test_linear4bit_stores_no_float_weight_and_matches_dequantised_dense(backend64):
    rng = np.random.default_rng(0)
    W = backend64.asarray(rng.standard_normal((6, 10)))
    b = backend64.asarray(rng.standard_normal(6))
    layer = Linear4bit.from_linear(Linear(W, b), "nf4", 32, True)
    assert set(layer.params) == {"bias"} and layer.params["bias"].dtype == np.float64
    assert layer.packed.dtype == np.uint8
    dense = _dense_twin(layer)
    x = backend64.asarray(rng.standard_normal((3, 4, 10)))
    y = layer.forward(x)
    assert layer.activation_bytes() == 0  # no dequantised W kept between the passes
    assert_close(y, dense.forward(x), "y", rtol=1e-15)
    dy = backend64.asarray(rng.standard_normal((3, 4, 6)))
    layer.zero_grad()
    dense.zero_grad()
    assert_close(layer.backward(dy), dense.backward(dy), "dx", rtol=1e-15)
    assert_close(layer.grads["bias"], dense.grads["bias"], "dbias", rtol=1e-15)


@given(d_in=st.integers(1, 5), d_out=st.integers(1, 5), n=st.integers(1, 3), quant_type=st.sampled_from(["nf4", "fp4"]))
def test_linear4bit_gradient_check(d_in, d_out, n, quant_type):
    rng = np.random.default_rng(d_in * 31 + d_out)
    layer = Linear4bit.from_linear(Linear(rng.standard_normal((d_out, d_in)), rng.standard_normal(d_out)), quant_type, 32)
    check_module_gradients(layer, [rng.standard_normal((n, d_in))], input_names=["x"])


def _adapter_pair(kind, W, rng_seed):
    """(adapter around Linear4bit, same adapter around the dequantised dense Linear)."""
    from spectral_peft.adapters.adalora import AdaLoraLinear
    from spectral_peft.adapters.dora import DoraLinear
    from spectral_peft.adapters.lora import LoraLinear
    from spectral_peft.adapters.rosa import RosaLinear

    q = Linear4bit.from_linear(Linear(W), "nf4", 32, True)
    q.freeze()
    dense = _dense_twin(q)
    out = []
    for base in (q, dense):
        rng = np.random.default_rng(rng_seed)
        if kind == "lora":
            layer = LoraLinear(base, r=2, lora_alpha=4, init_lora_weights=False, rng=rng)
        elif kind == "dora":
            layer = DoraLinear(base, r=2, lora_alpha=4, init_lora_weights=False, rng=rng)
            layer.params["lora_magnitude_vector"] *= 1.5  # away from init, so the norm term acts
        elif kind == "adalora":
            layer = AdaLoraLinear(base, r=2, lora_alpha=4, ranknum=2, rng=rng)
            layer.params["lora_E"][...] = np.random.default_rng(1).standard_normal(layer.params["lora_E"].shape)
        else:
            layer = RosaLinear(base, r=2, d=0.25, lora_alpha=4, init_lora_weights=False, rng=rng)
            mask = np.zeros(W.shape, dtype=bool)
            mask.reshape(-1)[np.random.default_rng(2).permutation(W.size)[: layer.nnz]] = True
            layer.set_support(mask)
            layer.params[next(k for k in layer.params if "spa" in k or "value" in k)][...] = \
                np.random.default_rng(3).standard_normal(layer.nnz)
        out.append(layer)
    return out


@pytest.mark.parametrize("kind", ["lora", "dora", "adalora", "rosa"])
def test_quantised_base_under_adapters(kind):
    """QLoRA / QDoRA / QAdaLoRA / QRoSA: gradients with respect to the inputs and every adapter parameter,
    by central differences, and equal to the same adapter on the dequantised dense layer."""
    rng = np.random.default_rng(9)
    W = rng.standard_normal((5, 6))
    layer, dense = _adapter_pair(kind, W, 4)
    x = rng.standard_normal((3, 6))
    if kind == "dora":
        # DoRA detaches the norm ||W + s·B A|| (paper §4.3), so central differences in A and B see a
        # different function by design: check x and m numerically, A and B against the dense twin.
        layer.freeze("lora_A.weight", "lora_B.weight")
        check_module_gradients(layer, [x], input_names=["x"])
        layer.unfreeze("lora_A.weight", "lora_B.weight")
    else:
        check_module_gradients(layer, [x], input_names=["x"])
    G = rng.standard_normal((3, 5))
    for m in (layer, dense):
        m.zero_grad()
    assert_close(layer.forward(x), dense.forward(x), "y", rtol=1e-14)
    assert_close(layer.backward(G), dense.backward(G), "dx", rtol=1e-14)
    for name, g in dense.named_grads().items():
        assert_close(layer.named_grads()[name], g, f"d{name}", rtol=1e-14)


class _TwoLayer(Module):
    def __init__(self, rng):
        super().__init__()
        self.fc1 = Linear(rng.standard_normal((8, 4)), rng.standard_normal(8))
        self.fc2 = Linear(rng.standard_normal((3, 8)))

    def forward(self, x):
        return self.fc2.forward(self.fc1.forward(x))

    def backward(self, dy):
        return self.fc1.backward(self.fc2.backward(dy))


def test_quantize_model_replaces_every_linear_and_counts_bytes():
    model = _TwoLayer(np.random.default_rng(0))
    dense_bytes = sum(m.params["weight"].nbytes for m in (model.fc1, model.fc2))
    paths = quantize_model(model, "nf4", 32, compress_statistics=False)
    assert paths == ["fc1", "fc2"]
    assert isinstance(model.fc1, Linear4bit) and isinstance(model.fc2, Linear4bit)
    model.freeze_all()
    expected = sum(m.weight_bytes() for m in (model.fc1, model.fc2)) + model.fc1.params["bias"].nbytes
    assert frozen_weight_bytes(model) == expected
    assert sum(m.weight_bytes() for m in (model.fc1, model.fc2)) < dense_bytes / 8


def test_quantize_model_target_modules_and_untouched_on_error():
    model = _TwoLayer(np.random.default_rng(0))
    assert quantize_model(model, target_modules=["fc2"]) == ["fc2"]
    assert type(model.fc1) is Linear and isinstance(model.fc2, Linear4bit)
    model = _TwoLayer(np.random.default_rng(0))
    model.fc2.params["weight"][0, 0] = np.nan
    with pytest.raises(ValueError, match="fc2.weight.*non-finite"):
        quantize_model(model)
    assert type(model.fc1) is Linear and type(model.fc2) is Linear  # nothing half-replaced
    with pytest.raises(ValueError, match="blocksize"):
        quantize_model(model, blocksize=48)


# --- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blocksize", [16, 48, 100, 8192, 64.0, True])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quantize_4bit(np.ones(64, np.float32), blocksize=blocksize)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_raise(bad):
    x = np.ones(100, np.float32)
    x[17] = bad
    with pytest.raises(ValueError, match="non-finite"):
        quantize_4bit(x)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_blockwise(x, blocksize=64)


@pytest.mark.parametrize("x", [np.ones(64, np.int32), np.ones(64, bool), np.ones(64, np.complex64), [1.0] * 64])
def test_wrong_dtype_raises(x):
    with pytest.raises(TypeError):
        quantize_4bit(x)


def test_bad_quant_type_and_bad_packed():
    with pytest.raises(ValueError, match="quant_type"):
        quantize_4bit(np.ones(64, np.float32), quant_type="int4")
    p, s = quantize_4bit(np.ones(64, np.float32))
    with pytest.raises(ValueError, match="packed"):
        dequantize_4bit(p[:-1], s)


def test_gpu_dequantisation_kernel_equals_cpu(device):
    if device == "cpu":
        pytest.skip("the CuPy kernel runs on a device (gpu, or gpu-emulated through its NumPy twin)")
    backend = get_backend(device)

    def dev(a):
        return to_device(np.asarray(a), backend)

    x = np.random.default_rng(0).standard_normal((257, 130)).astype(np.float32)
    for qt in ("nf4", "fp4"):
        p, s = quantize_4bit(x, 64, qt, compress_statistics=True)
        cpu = dequantize_4bit(p, s)
        s_gpu = B.QuantState(absmax=dev(s.absmax), shape=s.shape, code=dev(s.code),
                             blocksize=s.blocksize, quant_type=qt, dtype=s.dtype, offset=s.offset,
                             state2=B.QuantState(absmax=dev(s.state2.absmax), shape=s.state2.shape,
                                                 code=dev(s.state2.code), blocksize=256,
                                                 quant_type="dynamic"))
        gpu = dequantize_4bit(dev(p), s_gpu)
        assert np.array_equal(bits(to_host(gpu)), bits(cpu)), qt
