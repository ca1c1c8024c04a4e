"""Quantisation without any peer: codebooks against the published values, error bounds, packing,
fast paths equal to the canonical code, the nested absmax, Linear4bit (gradients by central
differences) under adapters, bad input. Parity with bitsandbytes: test_quant_golden.py (stored
trace) and test_quant_bnb.py (live)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spectral_peft.adapters.adalora import AdaLoraLinear
from spectral_peft.adapters.dora import DoraLinear
from spectral_peft.adapters.lora import LoraLinear
from spectral_peft.adapters.rosa import RosaLinear
from spectral_peft.backend import get_backend, to_device, to_host
from spectral_peft.module import Linear, Module
from spectral_peft.quant import (Linear4bit, bits_per_parameter, create_dynamic_map, dequantize_4bit,
                                 dequantize_absmax, dequantize_blockwise, double_quantize, frozen_weight_bytes,
                                 get_4bit_code, pack_4bit, quantize_4bit, quantize_blockwise, quantize_model,
                                 unpack_4bit)
from spectral_peft.quant import blockwise as B
from spectral_peft.quant.codebooks import max_gap, sorted_4bit_code
from spectral_peft.testing import assert_close, check_module_gradients
from tests._quant import bits

# NF4, index 0..15: Dettmers et al. 2023 (QLoRA, arXiv 2305.14314), Appendix E, and bitsandbytes
# bitsandbytes/functional.py get_4bit_type("nf4") (the same sixteen float32 values).
NF4_PUBLISHED = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (E2M1) in bit-pattern order, bitsandbytes/functional.py get_4bit_type("fp4"): this table
# divided by its largest magnitude, 12. Bit 0b1000 is the sign; code 8 is written "-0", an integer,
# so it is +0.0.
FP4_PUBLISHED_UNNORMALISED = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                              -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


# --- codebooks ------------------------------------------------------------------------------------
def test_nf4_construction_equals_published_values():
    code = get_4bit_code("nf4")
    assert np.array_equal(bits(code), bits(np.array(NF4_PUBLISHED, dtype=np.float32)))
    assert code[7] == 0.0 and code[0] == -1.0 and code[15] == 1.0
    assert np.all(np.diff(code) > 0)


def test_fp4_construction_equals_published_values():
    code = get_4bit_code("fp4")
    published = np.array(FP4_PUBLISHED_UNNORMALISED, dtype=np.float32) / np.float32(12)
    assert np.array_equal(bits(code), bits(published))
    assert np.all(code[8:][1:] == -code[:8][1:])  # bit 0b1000 is the sign


def test_dynamic_map_is_sorted_signed_and_spans_minus_one_to_one():
    code = create_dynamic_map()
    assert code.shape == (256,) and code.dtype == np.float32
    assert np.all(np.diff(code) >= 0) and code[-1] == 1.0 and code.min() >= -1.0
    assert 0.0 in code


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_sorted_code_orders_and_midpoints(quant_type):
    values, order, mids = sorted_4bit_code(quant_type)
    code = get_4bit_code(quant_type)
    assert np.array_equal(values, code[order]) and np.all(np.diff(values) >= 0)
    assert np.array_equal(np.sort(order), np.arange(16))
    assert_close(mids, (values[1:] + values[:-1]) / 2, "midpoints", rtol=1e-7)


def test_exact_midpoint_goes_to_lower_code():
    _, order, mids = sorted_4bit_code("nf4")
    x = np.zeros(64, dtype=np.float32)
    x[0] = 1.0
    x[1] = mids[10]  # exactly between sorted codes 10 and 11
    p, _ = quantize_4bit(x, 64, "nf4")
    q = unpack_4bit(p.reshape(-1), 64)
    assert q[1] == order[10] == 10



# --- the nested absmax (double quantisation): one dequantiser ---------------------------------------
def test_nested_absmax_is_dynamic_code_times_block_absmax_plus_offset():
    """dequantize_absmax undoes double quantisation as fl32(fl32(code8[q2] · absmax2_j) + offset),
    j = i // 256, written out here element by element."""
    x = np.random.default_rng(2).standard_normal(600 * 32).astype(np.float32) * 0.03
    _, state = quantize_4bit(x, 32, "nf4", compress_statistics=True)
    assert state.nested and state.absmax.dtype == np.uint8 and state.absmax.size == 600
    code8 = create_dynamic_map()
    expected = np.array([np.float32(code8[q] * state.state2.absmax[i // 256]) + np.float32(state.offset)
                         for i, q in enumerate(state.absmax)], dtype=np.float32)
    assert np.array_equal(bits(dequantize_absmax(state)), bits(expected))
    _, plain = quantize_4bit(x, 32, "nf4")
    assert np.array_equal(bits(dequantize_absmax(plain)), bits(plain.absmax))  # nothing to undo


def test_nested_absmax_bound():
    """Each dequantised absmax is within half a dynamic-map gap of its 256-block's absmax (plus float32
    rounding) of the true one."""
    x = np.random.default_rng(3).standard_normal(700 * 64).astype(np.float32)
    _, plain = quantize_4bit(x, 64, "nf4")
    state = double_quantize(plain)
    got = dequantize_absmax(state).astype(np.float64)
    scale = state.state2.absmax.astype(np.float64)[np.arange(700) // 256]
    bound = max_gap(create_dynamic_map()) / 2 * scale + 4 * np.finfo(np.float32).eps * plain.absmax
    assert np.all(np.abs(got - plain.absmax) <= bound)


def test_8bit_blockwise_with_a_nested_state_uses_the_same_dequantiser():
    """dequantize_blockwise of a double-quantised 8-bit state scales by dequantize_absmax."""
    x = np.random.default_rng(4).standard_normal(300 * 64).astype(np.float32)
    q, state = quantize_blockwise(x, blocksize=64)
    nested = double_quantize(state)
    got = dequantize_blockwise(q, nested)
    expected = state.code[q] * dequantize_absmax(nested)[np.arange(x.size) // 64]
    assert np.array_equal(bits(got), bits(expected))
    err = np.abs(got.astype(np.float64) - dequantize_blockwise(q, state))
    assert err.max() <= 0.01 * np.abs(x).max()  # the nested absmax is close to the plain one


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


@given(data=st.data(), quant_type=st.sampled_from(["nf4", "fp4"]), blocksize=st.sampled_from(B.BLOCKSIZES_4BIT),
       nested=st.booleans(), threads=st.sampled_from([1, 2]))
def test_fast_dequantise_equals_reference_over_chunks_and_nested_states(data, quant_type, blocksize, nested, threads):
    """The fast dequantiser, bit for bit, at every block size, plain and double-quantised states
    (whose absmax both paths get from dequantize_absmax), odd sizes, partial last blocks, all-zero
    blocks (absmax 0: the signs of the zero products) and chunks small enough that several of them
    run, on one or two threads."""
    n = data.draw(st.integers(1, 6000), label="n")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4)).astype(np.float32)
    if data.draw(st.booleans(), label="zero block"):
        start = data.draw(st.integers(0, (n - 1) // blocksize), label="zero block index") * blocksize
        x[start: start + blocksize] = 0.0
    shape = (n // 2, 2) if n % 2 == 0 and data.draw(st.booleans(), label="2-D") else (n,)
    p, s = quantize_4bit(x.reshape(shape), blocksize, quant_type, compress_statistics=nested)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(B, "DEQUANT_CHUNK", data.draw(st.sampled_from([32, 256, 4096, B.DEQUANT_CHUNK]), label="chunk"))
        mp.setattr(B, "FAST_PATH_THREADS", threads)
        mp.setattr(B, "PARALLEL_MIN_CHUNKS", 1)  # two chunks already run on two threads
        fast = dequantize_4bit(p, s, fast=True)
    slow = dequantize_4bit(p, s, fast=False)
    assert fast.shape == slow.shape == shape and fast.dtype == slow.dtype == np.float32
    assert np.array_equal(bits(fast), bits(slow))


@pytest.mark.parametrize("threads", [1, 2])
def test_fast_paths_equal_reference_across_chunks(monkeypatch, threads):
    monkeypatch.setattr(B, "FAST_PATH_THREADS", threads)
    monkeypatch.setattr(B, "PARALLEL_MIN_CHUNKS", 1)  # so that 3 chunks do run on 2 threads
    # three chunks of each fast path at its real chunk size (the dequantiser's are the larger)
    x = np.random.default_rng(11).standard_normal(3 * max(B.CHUNK, B.DEQUANT_CHUNK) + 100).astype(np.float32)
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
