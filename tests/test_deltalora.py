"""Delta-LoRA: the base weight moves by λ·s·(B'A' − BA) after step index t > K (t from 0), never before; no dropout;
LoRA's gradients; counts; the controller's state resumes exactly."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spectral_peft.adapters.deltalora import DeltaLoraConfig, DeltaLoraController, DeltaLoraLinear
from spectral_peft.adapters.lora import A_KEY, B_KEY
from spectral_peft.adapters.peft_model import get_peft_model
from spectral_peft.module import Linear, Module
from spectral_peft.testing import GRADCHECK_RTOL, assert_close, check_module_gradients


class Net(Module):
    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.a = Linear(rng.standard_normal((6, 5)), rng.standard_normal(6))
        self.b = Linear(rng.standard_normal((4, 6)))

    def forward(self, x):
        return self.b.forward(self.a.forward(x))

    def backward(self, dy):
        return self.a.backward(self.b.backward(dy))


def sgd_step(pm, x, lr=1e-3):
    """One plain SGD step on the adapter parameters of a loss sum(y²)/2."""
    y = pm.forward(x)
    pm.zero_grad()
    pm.backward(y)
    for _, m, k in pm.named_parameters(trainable_only=True):
        m.params[k] -= lr * m.grads[k]


@given(d_in=st.integers(1, 5), d_out=st.integers(1, 5), data=st.data(), seed=st.integers(0, 2**16))
def test_deltalora_layer_gradients_match_central_differences(d_in, d_out, data, seed):
    r = data.draw(st.integers(1, min(d_in, d_out)))
    rng = np.random.default_rng(seed)
    base = Linear(rng.standard_normal((d_out, d_in)))
    base.freeze()
    layer = DeltaLoraLinear(base, r=r, lora_alpha=2.0, rng=rng, init_lora_weights=False)
    check_module_gradients(layer, [rng.standard_normal((3, d_in))], seed=seed, rtol=GRADCHECK_RTOL)


def test_weight_moves_by_the_delta_of_the_products_after_K():
    K, lam = 2, 2.0
    pm = get_peft_model(Net(), DeltaLoraConfig(r=2, lora_alpha=3, target_modules=["a", "b"], delta_lambda=lam,
                                               delta_start_step=K, init_lora_weights=False))
    ctl = pm.controllers[0]
    assert isinstance(ctl, DeltaLoraController)
    x = np.random.default_rng(1).standard_normal((4, 5))
    a = pm.model.a
    W0 = a.base_layer.params["weight"].copy()
    for step in range(4):  # the 0-based step index t, as the Trainer passes it
        A0, B0 = a.params[A_KEY].copy(), a.params[B_KEY].copy()
        W_before = a.base_layer.params["weight"].copy()
        sgd_step(pm, x)
        ctl.after_optimizer_step(step)
        A1, B1 = a.params[A_KEY], a.params[B_KEY]
        if step <= K:
            assert np.array_equal(a.base_layer.params["weight"], W0)
        else:
            want = W_before + lam * a.scaling * (B1 @ A1 - B0 @ A0)
            assert_close(a.base_layer.params["weight"], want, f"W after step {step}", 1e-13)
            # the delta of the products, not the product of the deltas
            assert not np.allclose(want, W_before + lam * a.scaling * (B1 - B0) @ (A1 - A0))


def test_deltalora_counts_and_no_weight_gradient():
    pm = get_peft_model(Net(), DeltaLoraConfig(r=2, target_modules=["a", "b"]))
    assert pm.num_parameters(trainable_only=True) == 2 * (5 + 6) + 2 * (6 + 4)
    assert "weight" in pm.model.a.base_layer.frozen


def test_controller_state_resumes_exactly():
    cfg = dict(r=2, lora_alpha=3, target_modules=["a", "b"], delta_start_step=0, init_lora_weights=False)
    x = np.random.default_rng(2).standard_normal((4, 5))
    pm = get_peft_model(Net(), DeltaLoraConfig(**cfg))
    for step in (0, 1):
        sgd_step(pm, x)
        pm.controllers[0].after_optimizer_step(step)
    saved = {k: v.copy() for k, v in pm.state_dict().items()}
    ctl_state = {k: v.copy() for k, v in pm.controllers[0].state_dict().items()}
    sgd_step(pm, x)
    pm.controllers[0].after_optimizer_step(2)
    pm2 = get_peft_model(Net(), DeltaLoraConfig(**cfg))
    for n, m, k in pm2.named_parameters():
        m.params[k][...] = saved[n]
    pm2.controllers[0].load_state_dict(ctl_state)
    sgd_step(pm2, x)
    pm2.controllers[0].after_optimizer_step(2)
    for n, v in pm.state_dict().items():
        assert np.array_equal(pm2.state_dict()[n], v), n
    with pytest.raises(ValueError, match=r"prev_A.*expected shape \(2, 5\)"):
        pm2.controllers[0].load_state_dict({})


@pytest.mark.parametrize("kwargs, match", [
    (dict(lora_dropout=0.1), r"lora_dropout must be 0.0"),
    (dict(delta_start_step=-1), r"delta_start_step must be an integer >= 0, got -1"),
    (dict(use_dora=True), r"use_dora=True is not supported"),
])
def test_bad_deltalora_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeltaLoraConfig(target_modules=["a"], **kwargs)
