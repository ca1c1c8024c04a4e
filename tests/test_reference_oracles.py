"""The engine against reference/naive.py: loop-by-loop float64 implementations written from the
papers' equations, sharing no code with spectral_peft. A second witness beside the PyTorch/PEFT/
bitsandbytes parity tests, and the only one for the methods with no third-party peer (DyLoRA,
Delta-LoRA, RoSA)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference import naive
from spectral_peft.adapters.adalora import budget_schedule
from spectral_peft.adapters.deltalora import DeltaLoraConfig
from spectral_peft.adapters.dora import M_KEY, DoraLinear
from spectral_peft.adapters.dylora import DyLoraLinear
from spectral_peft.adapters.lora import A_KEY, B_KEY, LoraLinear
from spectral_peft.adapters.peft_model import get_peft_model
from spectral_peft.adapters.rosa import VALUES_KEY, RosaLinear
from spectral_peft.module import Linear, Module
from spectral_peft.quant import get_4bit_code, quantize_4bit
from spectral_peft.quant.blockwise import unpack_4bit
from spectral_peft.testing import assert_close

RTOL64 = 1e-12  # float64, same equations, different summation order


def _base_and_input(rng, n, d_in, d_out):
    W, b, x = rng.standard_normal((d_out, d_in)), rng.standard_normal(d_out), rng.standard_normal((n, d_in))
    return W, b, x


shapes = dict(n=st.integers(1, 4), d_in=st.integers(2, 6), d_out=st.integers(2, 6), seed=st.integers(0, 2**16))


@given(**shapes, rs=st.booleans())
def test_lora_and_rslora_equal_the_naive_oracle(n, d_in, d_out, seed, rs):
    rng = np.random.default_rng(seed)
    W, b, x = _base_and_input(rng, n, d_in, d_out)
    r = min(2, d_in, d_out)
    layer = LoraLinear(Linear(W.copy(), b.copy()), r=r, lora_alpha=3.0, use_rslora=rs, rng=rng)
    layer.params[B_KEY][...] = rng.standard_normal((d_out, r))  # non-zero B: the branch matters
    expected = naive.lora_forward(x, W, b, layer.params[A_KEY], layer.params[B_KEY], 3.0, use_rslora=rs)
    assert_close(layer.forward(x), expected, "lora y", RTOL64)


@given(**shapes)
def test_dora_equals_the_naive_oracle(n, d_in, d_out, seed):
    rng = np.random.default_rng(seed)
    W, b, x = _base_and_input(rng, n, d_in, d_out)
    r = min(2, d_in, d_out)
    layer = DoraLinear(Linear(W.copy(), b.copy()), r=r, lora_alpha=2.0, rng=rng)
    layer.params[B_KEY][...] = rng.standard_normal((d_out, r))
    layer.params[M_KEY][...] = rng.uniform(0.5, 2.0, d_out)
    p = layer.params
    expected = naive.dora_forward(x, W, b, p[A_KEY], p[B_KEY], p[M_KEY], 2.0)
    assert_close(layer.forward(x), expected, "dora y", RTOL64)


@given(**shapes, data=st.data())
def test_dylora_at_rank_b_equals_the_naive_truncation(n, d_in, d_out, seed, data):
    rng = np.random.default_rng(seed)
    W, b, x = _base_and_input(rng, n, d_in, d_out)
    r = min(3, d_in, d_out)
    layer = DyLoraLinear(Linear(W.copy(), b.copy()), r=r, lora_alpha=4.0, rng=rng)
    layer.params[B_KEY][...] = rng.standard_normal((d_out, r))
    rank = data.draw(st.integers(1, r))
    layer.set_rank(rank)
    expected = naive.dylora_forward(x, W, b, layer.params[A_KEY], layer.params[B_KEY], 4.0, rank)
    assert_close(layer.forward(x), expected, f"dylora y at b={rank}", RTOL64)


@given(**shapes, density=st.sampled_from([0.0, 0.2, 0.5, 1.0]))
def test_rosa_equals_the_naive_oracle(n, d_in, d_out, seed, density):
    rng = np.random.default_rng(seed)
    W, b, x = _base_and_input(rng, n, d_in, d_out)
    r = min(2, d_in, d_out)
    layer = RosaLinear(Linear(W.copy(), b.copy()), r=r, d=density, lora_alpha=2.0, rng=rng)
    layer.params["rosa_B.weight"][...] = rng.standard_normal((d_out, r))
    entries = {}
    if layer.nnz:
        flat = rng.permutation(d_out * d_in)[: layer.nnz]
        mask = np.zeros(d_out * d_in, dtype=bool)
        mask[flat] = True
        mask = mask.reshape(d_out, d_in)
        layer.set_support(mask)
        values = rng.standard_normal(layer.nnz)
        layer.params[VALUES_KEY][...] = values
        # CSR order is row-major over the support: pair each value with its (row, col)
        entries = dict(zip(map(tuple, np.argwhere(mask)), values))
    A, B = layer.params["rosa_A.weight"], layer.params["rosa_B.weight"]
    expected = naive.rosa_forward(x, W, b, A, B, 2.0, entries)
    assert_close(layer.forward(x), expected, "rosa y", RTOL64)


class _OneLinear(Module):
    def __init__(self, W):
        super().__init__()
        self.proj = Linear(W)


def test_delta_lora_moves_the_base_by_the_delta_of_the_products():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((5, 4))
    model = _OneLinear(W.copy())
    peft = get_peft_model(model, DeltaLoraConfig(target_modules=["proj"], r=2, lora_alpha=4.0, delta_lambda=2.0,
                                                 delta_start_step=1))
    (controller,) = peft.controllers
    layer = model.proj
    A0, B0 = layer.params[A_KEY].copy(), layer.params[B_KEY].copy()
    # one "optimizer step" inside the warm-up (step 1 <= K): the base must not move
    layer.params[A_KEY] += rng.standard_normal(A0.shape)
    layer.params[B_KEY] += rng.standard_normal(B0.shape)
    controller.after_optimizer_step(1)
    np.testing.assert_array_equal(layer.base_layer.params["weight"], W)
    A1, B1 = layer.params[A_KEY].copy(), layer.params[B_KEY].copy()
    layer.params[A_KEY] += rng.standard_normal(A0.shape)
    layer.params[B_KEY] += rng.standard_normal(B0.shape)
    controller.after_optimizer_step(2)
    expected = naive.delta_lora_update(W, A1, B1, layer.params[A_KEY], layer.params[B_KEY], 4.0 / 2, 2.0)
    assert_close(layer.base_layer.params["weight"], expected, "W after Delta-LoRA", RTOL64)


@given(init_r=st.integers(1, 12), data=st.data(), n=st.integers(1, 6), total=st.integers(5, 60))
def test_adalora_budget_equals_the_papers_schedule(init_r, data, n, total):
    target_r = data.draw(st.integers(0, init_r))
    tinit = data.draw(st.integers(0, total - 2))
    tfinal = data.draw(st.integers(0, total - tinit - 1))
    for step in range(total + 2):
        budget, _ = budget_schedule(step, init_r * n, target_r * n, tinit, tfinal, total, 1)
        assert budget == naive.adalora_budget(step, init_r, target_r, n, tinit, tfinal, total), step


def test_nf4_codebook_equals_the_papers_construction():
    assert_close(get_4bit_code("nf4"), np.array(naive.nf4_codebook()), "nf4 codebook", 1e-6)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@given(seed=st.integers(0, 2**16), n=st.integers(1, 300))
def test_4bit_codes_are_the_nearest_codes(quant_type, seed, n):
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    packed, state = quantize_4bit(x, blocksize=64, quant_type=quant_type)
    codes = unpack_4bit(np.asarray(packed).reshape(-1), n)
    book = [float(c) for c in get_4bit_code(quant_type)]
    want, absmax = naive.blockwise_quantize([float(v) for v in x], book, 64)
    assert_close(np.asarray(state.absmax), np.array(absmax), "absmax", 0.0)
    # Compare the dequantised values, not indices: FP4 holds +0 and -0, two indices of one value.
    scaled = x / np.repeat(np.asarray(state.absmax), 64)[:n]
    got_err = np.abs(scaled - np.asarray(book)[codes])
    want_err = np.abs(scaled - np.asarray(book)[np.array(want)])
    assert np.all(got_err <= want_err + 1e-7), "a code is farther from the value than the nearest code"
