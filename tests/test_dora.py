"""DoRA layer: central differences (norm held constant, as the method detaches it), PyTorch autograd
parity with the detached norm, init, merge/unmerge, parameter count, magnitude init."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spectral_peft.adapters.dora import M_KEY, DoraLinear
from spectral_peft.adapters.lora import A_KEY, B_KEY, LoraConfig
from spectral_peft.adapters.peft_model import get_peft_model
from spectral_peft.backend import get_backend, to_host
from spectral_peft.module import Linear, Module
from spectral_peft.testing import GRADCHECK_RTOL, RTOL, assert_close, check_module_gradients


def make_dora(d_in, d_out, r, alpha=3.0, bias=True, seed=0, backend=None, perturb_m=True, **kw):
    rng = np.random.default_rng(seed)
    b = backend or get_backend("cpu", "float64")
    base = Linear(b.asarray(rng.standard_normal((d_out, d_in))),
                  b.asarray(rng.standard_normal(d_out)) if bias else None)
    base.freeze()
    layer = DoraLinear(base, r=r, lora_alpha=alpha, rng=np.random.default_rng(seed + 1), init_lora_weights=False, **kw)
    if perturb_m:  # m != ||W + ΔW||, so g = m/n differs from 1 and every term matters
        layer.params[M_KEY] = layer.params[M_KEY] * b.asarray(rng.uniform(0.5, 1.5, size=d_out))
    return layer


def torch_dora(layer, x, G, tdt, keep=None, p=0.0):
    """DoRA written out in torch from PEFT's definition (norm detached); returns y, dx, dA, dB, dm."""
    W, bias = (torch.tensor(to_host(layer.base_layer.params[k]), dtype=tdt) if k in layer.base_layer.params
               else None for k in ("weight", "bias"))
    A, B, m = (torch.tensor(to_host(layer.params[k]), dtype=tdt, requires_grad=True) for k in (A_KEY, B_KEY, M_KEY))
    tx = torch.tensor(x, dtype=tdt, requires_grad=True)
    s = layer.scaling
    norm = torch.linalg.norm(W + s * (B @ A).detach(), dim=1).detach()
    g = m / norm
    xd = tx if keep is None else tx * torch.tensor(keep) / (1 - p)
    base = tx @ W.T + (bias if bias is not None else 0)
    y = base + (g - 1) * (xd @ W.T) + g * (s * ((xd @ A.T) @ B.T))
    y.backward(torch.tensor(G, dtype=tdt))
    return y.detach().numpy(), tx.grad.numpy(), A.grad.numpy(), B.grad.numpy(), m.grad.numpy()


@given(n=st.integers(1, 3), d_in=st.integers(1, 5), d_out=st.integers(1, 5), data=st.data(),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_dora_gradients_match_central_differences_with_the_norm_held(n, d_in, d_out, data, bias, seed):
    r = data.draw(st.integers(1, min(d_in, d_out)))
    layer = make_dora(d_in, d_out, r, bias=bias, seed=seed)
    n_fixed = layer.weight_norm().copy()
    layer.weight_norm = lambda: n_fixed  # the detached norm is a constant: differentiate with it fixed
    x = np.random.default_rng(seed + 2).standard_normal((n, d_in))
    check_module_gradients(layer, [x], seed=seed, rtol=GRADCHECK_RTOL)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_dora_matches_torch_autograd_with_detached_norm(device, dtype):
    b = get_backend(device, dtype)
    layer = make_dora(7, 6, 3, backend=b)
    rng = np.random.default_rng(5)
    x, G = rng.standard_normal((2, 4, 7)), rng.standard_normal((2, 4, 6))
    y = layer.forward(b.asarray(x))
    dx = layer.backward(b.asarray(G))
    ty, tdx, tdA, tdB, tdm = torch_dora(layer, x, G, getattr(torch, dtype))
    for name, mine, theirs in (("y", y, ty), ("dx", dx, tdx), ("dA", layer.grads[A_KEY], tdA),
                               ("dB", layer.grads[B_KEY], tdB), ("dm", layer.grads[M_KEY], tdm)):
        assert_close(to_host(mine), theirs, name, RTOL[dtype])


def test_dora_with_dropout_matches_torch_with_the_same_mask():
    layer = make_dora(6, 5, 2, lora_dropout=0.25)
    rng = np.random.default_rng(3)
    x, G = rng.standard_normal((9, 6)), rng.standard_normal((9, 5))
    y = layer.forward(x)
    keep = layer.cache[1][0].copy()
    dx = layer.backward(G)
    ty, tdx, tdA, tdB, tdm = torch_dora(layer, x, G, torch.float64, keep=keep, p=0.25)
    for name, mine, theirs in (("y", y, ty), ("dx", dx, tdx), ("dA", layer.grads[A_KEY], tdA),
                               ("dB", layer.grads[B_KEY], tdB), ("dm", layer.grads[M_KEY], tdm)):
        assert_close(mine, theirs, name, 1e-10)


def test_magnitude_initialised_to_row_norms_and_init_output_is_exactly_base():
    rng = np.random.default_rng(0)
    W, bias = rng.standard_normal((6, 5)), rng.standard_normal(6)
    base = Linear(W.copy(), bias.copy())
    layer = DoraLinear(base, r=2, lora_alpha=4, rng=np.random.default_rng(1))  # B = 0
    assert_close(layer.params[M_KEY], np.sqrt((W ** 2).sum(axis=1)), "m", 1e-14)
    x = rng.standard_normal((3, 5))
    assert np.array_equal(layer.forward(x), x @ W.T + bias)


def test_dora_merge_unmerge():
    layer = make_dora(5, 4, 2)
    W0 = layer.base_layer.params["weight"].copy()
    x = np.random.default_rng(1).standard_normal((3, 5))
    y = layer.forward(x).copy()
    V = W0 + layer.scaling * layer.params[B_KEY] @ layer.params[A_KEY]
    layer.merge()
    m = layer.params[M_KEY]
    assert_close(layer.base_layer.params["weight"], (m / np.linalg.norm(V, axis=1))[:, None] * V, "merged W", 1e-13)
    assert_close(layer.forward(x), y, "merged y", 1e-12)
    layer.unmerge()
    assert_close(layer.base_layer.params["weight"], W0, "unmerged W", 1e-13)


def test_dora_parameter_count():
    class Net(Module):
        def __init__(self):
            super().__init__()
            self.a = Linear(np.ones((6, 5)))
            self.b = Linear(np.ones((3, 6)))

    pm = get_peft_model(Net(), LoraConfig(r=2, target_modules=["a", "b"], use_dora=True))
    assert pm.num_parameters(trainable_only=True) == 2 * (5 + 6) + 6 + 2 * (6 + 3) + 3
    names = sorted(n for n, _, _ in pm.named_parameters(trainable_only=True))
    assert "base_model.model.a.lora_magnitude_vector" in names and len(names) == 6


def test_dora_merge_and_unload_gives_the_adapted_outputs():
    from spectral_peft.adapters.peft_model import merge_and_unload

    class Net(Module):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(0)
            self.a = Linear(rng.standard_normal((6, 5)), rng.standard_normal(6))
            self.b = Linear(rng.standard_normal((3, 6)))

        def forward(self, x):
            return self.b.forward(self.a.forward(x))

    pm = get_peft_model(Net(), LoraConfig(r=2, target_modules=["a", "b"], use_dora=True, init_lora_weights=False))
    for _, m in pm.adapter_layers():
        m.params[M_KEY] = m.params[M_KEY] * np.linspace(0.5, 1.5, m.d_out)
    x = np.random.default_rng(1).standard_normal((4, 5))
    y = pm.forward(x).copy()
    plain = merge_and_unload(pm)
    assert type(plain.a) is Linear and type(plain.b) is Linear
    assert_close(plain.forward(x), y, "merged model output", 1e-12)
