"""AdaLoRA and RoSA speak the verbs every method does: effective_weight is the matrix the forward
applies, merge/unmerge (and merge_and_unload) keep the outputs and restore W, and the parameter
count is the closed formula of the config and the layer shapes, equal to the trainable entries."""
import numpy as np
import pytest

from spectral_peft.adapters.adalora import AdaLoraConfig, AdaLoraLinear
from spectral_peft.adapters.peft_model import merge_and_unload
from spectral_peft.adapters.peft_model import get_peft_model
from spectral_peft.adapters.rosa import VALUES_KEY, RosaConfig, RosaLinear
from spectral_peft.module import Linear
from spectral_peft.testing import assert_close
from tests._nets import TwoLinear

SHAPES = {"a": (6, 5), "b": (4, 6)}  # (d_out, d_in) of TwoLinear's linears


def adalora_model(init_r=3):
    pm = get_peft_model(TwoLinear(seed=1), AdaLoraConfig(target_modules=["a", "b"], init_r=init_r, target_r=1,
                                                         total_step=10, init_lora_weights=False, lora_alpha=5))
    return pm


def rosa_model(r=2, d=0.3):
    pm = get_peft_model(TwoLinear(seed=2), RosaConfig(r=r, d=d, target_modules=["a", "b"], schedule="wl0",
                                                      lora_alpha=3, init_lora_weights=False))
    rng = np.random.default_rng(3)
    for _, layer in pm.adapter_layers():
        flat = np.zeros(layer.d_out * layer.d_in, dtype=bool)
        flat[rng.choice(flat.size, layer.nnz, replace=False)] = True
        layer.set_support(flat.reshape(layer.shape))
        layer.params[VALUES_KEY][...] = rng.standard_normal(layer.nnz)
    return pm


MODELS = {"adalora": adalora_model, "rosa": rosa_model}


@pytest.mark.parametrize("method", list(MODELS))
def test_effective_weight_is_what_the_forward_applies(method):
    pm = MODELS[method]()
    pm.eval()
    x = np.random.default_rng(4).standard_normal((3, 5))
    for path, layer in pm.adapter_layers():
        xi = x if layer.d_in == 5 else np.random.default_rng(5).standard_normal((3, layer.d_in))
        bias = layer.base_layer.params.get("bias")
        lin = xi @ layer.effective_weight().T + (0.0 if bias is None else bias)
        assert_close(lin, layer.forward(xi), f"{path}: x @ effective_weight.T vs forward", rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("method", list(MODELS))
def test_merge_keeps_outputs_and_unmerge_restores_W(method):
    pm = MODELS[method]()
    pm.eval()
    x = np.random.default_rng(6).standard_normal((4, 5))
    y = pm.forward(x)
    W0 = {p: m.base_layer.params["weight"].copy() for p, m in pm.adapter_layers()}
    E0 = {p: m.effective_weight() for p, m in pm.adapter_layers()}
    for _, layer in pm.adapter_layers():
        layer.merge()
    assert_close(pm.forward(x), y, f"{method}: merged output", rtol=1e-13, atol=1e-13)
    for p, layer in pm.adapter_layers():
        assert_close(layer.effective_weight(), E0[p], f"{p}: merged effective_weight", rtol=1e-13, atol=1e-13)
        with pytest.raises(RuntimeError, match="already merged"):
            layer.merge()
        layer.unmerge()
        assert_close(layer.base_layer.params["weight"], W0[p], f"{p}: W after unmerge", rtol=0, atol=1e-14)
    assert_close(pm.forward(x), y, f"{method}: unmerged output", rtol=1e-13, atol=1e-13)
    plain = merge_and_unload(pm)
    assert isinstance(plain.a, Linear) and isinstance(plain.b, Linear)
    assert_close(plain.forward(x), y, f"{method}: merge_and_unload output", rtol=1e-13, atol=1e-13)


def test_adalora_refuses_masking_a_merged_layer():
    pm = adalora_model()
    layer = next(m for _, m in pm.adapter_layers())
    layer.merge()
    with pytest.raises(RuntimeError, match="merged AdaLoraLinear"):
        layer.apply_mask(np.array([True, False, True]))


@pytest.mark.parametrize("init_r", [1, 3, 7])
def test_adalora_parameter_count_is_the_formula_and_the_trainable_entries(init_r):
    pm = adalora_model(init_r)
    formula = sum(init_r * (d_in + d_out + 1) for d_out, d_in in SHAPES.values())  # A, B and E
    assert sum(m.adapter_parameter_count() for _, m in pm.adapter_layers()) == formula
    assert pm.num_parameters(trainable_only=True) == formula
    layer = next(m for _, m in pm.adapter_layers() if isinstance(m, AdaLoraLinear))
    layer.resize(np.arange(init_r) == 0)  # resized to one triplet
    assert layer.adapter_parameter_count() == layer.d_in + layer.d_out + 1 == layer.num_parameters(trainable_only=True)


@pytest.mark.parametrize("r, d", [(0, 0.3), (2, 0.0), (2, 0.37), (3, 1.0)])
def test_rosa_parameter_count_is_the_formula_and_the_trainable_entries(r, d):
    pm = get_peft_model(TwoLinear(), RosaConfig(r=r, d=d, target_modules=["a", "b"],
                                                schedule="wl0" if d > 0 else "lora_only"))
    formula = sum(r * (d_in + d_out) + int(d * (d_out * d_in)) for d_out, d_in in SHAPES.values())
    assert sum(m.adapter_parameter_count() for _, m in pm.adapter_layers()) == formula
    assert pm.num_parameters(trainable_only=True) == formula
    assert all(isinstance(m, RosaLinear) for _, m in pm.adapter_layers())


def test_rosa_report_gives_each_layers_density_and_the_largest_support():
    pm = rosa_model(d=0.3)
    report = pm.controllers[0].report(lambda: 0.0)
    assert report["density"] == {"a": {"nnz": 9, "shape": [6, 5], "density": 9 / 30},
                                 "b": {"nnz": 7, "shape": [4, 6], "density": 7 / 24}}
    a = dict(pm.adapter_layers())["base_model.model.a"]
    assert report["support"]["layer"] == "a" and report["support"]["nnz"] == 9
    assert report["support"]["indices"] == [int(i) for i in np.flatnonzero(a.support_mask())]
