"""Merging a LoRA into a 4-bit base (spectral_peft/quant/merge.py).

- merge_float is W_q + s·B A to one rounding: the merged model's logits equal the unmerged
  model's (float64, 1e-12);
- merge_requantize is bitsandbytes' quantize_4bit of the float32 sum, bit for bit (what PEFT's
  merge into a bnb Linear4bit computes), and its logits differ from the unmerged model's;
- merge_error's half-steps equal a brute-force search over every code's neighbours; a delta below
  half a step everywhere is erased (codes unchanged, delta_kept ~ 0), one of many steps survives;
- every layer is checked before any is replaced; bad arguments are refused by name.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_peft.adapters.lora import LoraConfig
from spectral_peft.adapters.peft_model import get_peft_model
from spectral_peft.backend import get_backend
from spectral_peft.module import Linear
from spectral_peft.quant import Linear4bit, quantize_model
from spectral_peft.quant.blockwise import dequantize_absmax
from spectral_peft.quant.codebooks import get_4bit_code
from spectral_peft.quant.merge import (half_steps, merge_error, merge_float, merge_lora_4bit, merge_requantize,
                                       exact_merged_weight)
from spectral_peft.testing import assert_close

from test_llama import build, tiny  # noqa: E402

BE = get_backend("cpu", "float64")


def lora_on_4bit(d_out=48, d_in=64, r=4, seed=0, delta_scale=1.0, quant_type="nf4", nested=True):
    """A LoRA layer (B drawn, scaled) over a Linear4bit quantised from a random dense weight."""
    rng = np.random.default_rng(seed)
    dense = Linear(rng.standard_normal((d_out, d_in)) * 0.05, rng.standard_normal(d_out) * 0.01)
    base = Linear4bit.from_linear(dense, quant_type=quant_type, blocksize=64, compress_statistics=nested)
    from spectral_peft.adapters.lora import LoraLinear
    from spectral_peft.backend import host_rng

    layer = LoraLinear(base, r=r, lora_alpha=2 * r, rng=host_rng(seed))
    layer.params["lora_B.weight"][...] = rng.standard_normal((d_out, r)) * 0.05 * delta_scale
    return layer


def test_float_merge_is_exact_and_the_model_computes_the_same_logits():
    model = build(tiny("llama", H=4, Hkv=2), seed=1)
    quantize_model(model, quant_type="nf4", blocksize=64)
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]), seed=2)
    rng = np.random.default_rng(3)
    for _, layer in pm.adapter_layers():
        layer.params["lora_B.weight"][...] = rng.standard_normal(layer.params["lora_B.weight"].shape) * 0.1
    ids = rng.integers(0, 41, (2, 9))
    pm.eval()
    unmerged = pm.forward(ids).logits.copy()
    layers = pm.adapter_layers()
    exact = [exact_merged_weight(layer) for _, layer in layers]
    for (_, layer), W in zip(layers, exact):
        assert_close(merge_float(layer).params["weight"], W, "merge_float weight", 1e-15)
    merged = merge_lora_4bit(pm, "float")
    merged.eval()
    assert_close(merged.forward(ids).logits, unmerged, "float-merged logits vs unmerged", 1e-12)


def test_requantize_is_bitsandbytes_quantisation_of_the_float32_sum():
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("bitsandbytes.functional")
    for quant_type in ("nf4", "fp4"):
        layer = lora_on_4bit(quant_type=quant_type, delta_scale=3.0, nested=False)
        W = exact_merged_weight(layer).astype(np.float32)
        pb, sb = F.quantize_4bit(torch.from_numpy(W), blocksize=64, quant_type=quant_type, compress_statistics=False)
        merged = merge_requantize(layer)
        np.testing.assert_array_equal(merged.packed, pb.numpy(), err_msg=f"{quant_type} packed codes")
        np.testing.assert_array_equal(merged.quant_state.absmax, sb.absmax.numpy(), err_msg=f"{quant_type} absmax")
        assert merged.quant_state.nested is False
        assert merge_requantize(lora_on_4bit(quant_type=quant_type)).quant_state.nested is True  # kept as the base


def test_half_steps_equal_a_brute_force_search():
    layer = lora_on_4bit(nested=False)
    base = layer.base_layer
    code = np.sort(get_4bit_code("nf4").astype(np.float64))
    W = base.effective_weight().reshape(-1).astype(np.float64)
    scale = np.repeat(np.asarray(dequantize_absmax(base.quant_state), dtype=np.float64), 64)[:W.size]
    expected = np.empty(W.size)
    for i, (w, s) in enumerate(zip(W, scale)):
        values = code * s
        k = int(np.argmin(np.abs(values - w)))  # the element's own code value
        others = np.delete(values, k)
        expected[i] = 0.5 * np.min(np.abs(others - values[k]))
    assert_close(half_steps(base), expected, "half steps", 1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), quant_type=st.sampled_from(["nf4", "fp4"]))
def test_a_delta_below_half_a_step_is_erased_one_of_many_steps_survives(seed, quant_type):
    # single quantisation, so that only Δ can move the block scales
    tiny_delta = lora_on_4bit(seed=seed, delta_scale=1e-4, quant_type=quant_type, nested=False)
    e = merge_error(tiny_delta, merge_requantize(tiny_delta))
    assert e["below_half_step"] > 0.99 and e["codes_unchanged"] > 0.99
    assert abs(e["delta_kept"]) < 0.2 and e["rel_fro"] > 0.8, e
    big = lora_on_4bit(seed=seed, delta_scale=30.0, quant_type=quant_type)
    e = merge_error(big, merge_requantize(big))
    assert e["delta_kept"] > 0.8 and e["rel_fro"] < 0.5, e
    f = merge_error(big, merge_float(big))
    assert f["rel_fro"] < 1e-12 and abs(f["delta_kept"] - 1) < 1e-12


def test_every_layer_is_checked_before_any_is_replaced():
    model = build(tiny("llama", H=4, Hkv=2), seed=1)
    quantize_model(model, target_modules=["q_proj"])  # v_proj stays dense
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), seed=2)
    before = [type(layer).__name__ for _, layer in pm.adapter_layers()]
    with pytest.raises(TypeError, match="needs a LoRA layer over a Linear4bit, got LoraLinear over Linear"):
        merge_lora_4bit(pm, "requantize")
    assert [type(layer).__name__ for _, layer in pm.adapter_layers()] == before
    with pytest.raises(ValueError, match="how must be one of"):
        merge_lora_4bit(pm, "requant")
    assert merge_lora_4bit(pm, "unmerged") is pm


def test_requantising_an_unchanged_weight_is_exact_without_double_quantisation_only():
    """Δ = 0: a single-quantised base requantises to itself bit for bit (each block's max element
    sits on code ±1, so the absmax is recovered exactly); a double-quantised one does not, because
    the block maxima are quantised again around a new mean: requantisation moves the base itself."""
    for nested in (False, True):
        layer = lora_on_4bit(seed=4, delta_scale=0.0, nested=nested)
        merged = merge_requantize(layer)
        moved = float(np.max(np.abs(merged.effective_weight() - layer.base_layer.effective_weight())))
        if nested:
            assert moved > 0, "double quantisation happened to be idempotent: the case proves nothing"
        else:
            assert moved == 0.0
            np.testing.assert_array_equal(merged.packed, layer.base_layer.packed)
