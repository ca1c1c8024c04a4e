"""LoRA-FA: A frozen, only x Aᵀ cached, dB equal to LoRA's, the memory saving, the corrected gradient."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spectral_peft.adapters.lora import A_KEY, B_KEY, LoraConfig, LoraLinear
from spectral_peft.adapters.lorafa import LoraFAConfig, LoraFAController, LoraFALinear
from spectral_peft.adapters.peft_model import get_peft_model
from spectral_peft.module import Linear
from spectral_peft.testing import GRADCHECK_RTOL, assert_close, check_module_gradients
from tests._nets import TwoLinear


def pair(d_in=7, d_out=5, r=3, seed=0):
    """A LoRA layer and a LoRA-FA layer with identical base and adapter weights (B != 0)."""
    rng = np.random.default_rng(seed)
    W, b = rng.standard_normal((d_out, d_in)), rng.standard_normal(d_out)
    out = []
    for cls in (LoraLinear, LoraFALinear):
        base = Linear(W.copy(), b.copy())
        base.freeze()
        out.append(cls(base, r=r, lora_alpha=4.0, rng=np.random.default_rng(seed + 1), init_lora_weights=False))
    return out


@given(d_in=st.integers(1, 5), d_out=st.integers(1, 5), data=st.data(), seed=st.integers(0, 2**16))
def test_lorafa_gradients_match_central_differences(d_in, d_out, data, seed):
    r = data.draw(st.integers(1, min(d_in, d_out)))
    _, fa = pair(d_in, d_out, r, seed)
    x = np.random.default_rng(seed).standard_normal((3, d_in))
    check_module_gradients(fa, [x], seed=seed, rtol=GRADCHECK_RTOL)  # A frozen: must get no gradient


def test_lorafa_gradient_of_B_equals_lora_and_A_gets_none():
    lora, fa = pair()
    rng = np.random.default_rng(1)
    x, G = rng.standard_normal((2, 6, 7)), rng.standard_normal((2, 6, 5))
    assert np.array_equal(lora.forward(x), fa.forward(x))
    dx_l, dx_f = lora.backward(G), fa.backward(G)
    assert_close(dx_f, dx_l, "dx", 1e-14)
    assert_close(fa.grads[B_KEY], lora.grads[B_KEY], "dB", 1e-14)
    assert A_KEY not in fa.grads and A_KEY in fa.frozen
    # and against torch autograd
    A = torch.tensor(fa.params[A_KEY])
    B = torch.tensor(fa.params[B_KEY], requires_grad=True)
    ty = fa.scaling * (torch.tensor(x) @ A.T) @ B.T
    ty.backward(torch.tensor(G))
    assert_close(fa.grads[B_KEY], B.grad.numpy(), "dB vs torch", 1e-10)


def test_lorafa_caches_only_the_rank_r_product():
    lora, fa = pair(d_in=64, d_out=32, r=4)
    x = np.random.default_rng(2).standard_normal((100, 64))
    lora.forward(x)
    fa.forward(x)
    N = 100
    assert fa.cache[0][0] is None and fa.cache[0][1].shape == (N, 4)
    assert fa.activation_bytes() == N * 4 * 8  # x Aᵀ only
    assert lora.activation_bytes() == N * (64 + 4) * 8  # x and x Aᵀ


def test_lorafa_trainable_count_and_file_arrays():
    pm = get_peft_model(TwoLinear(), LoraFAConfig(r=2, target_modules=["a", "b"]))
    assert pm.num_parameters(trainable_only=True) == 6 * 2 + 4 * 2  # d_out · r per layer
    assert sorted(pm.model.a.peft_state_dict()) == [A_KEY, B_KEY]  # A is written: PEFT needs it
    assert pm.controllers == []


def test_corrected_gradient_is_the_projected_gradient():
    pm = get_peft_model(TwoLinear(), LoraFAConfig(r=2, lora_alpha=6, target_modules=["a", "b"], corrected_grad=True,
                                            init_lora_weights=False))
    ctl = pm.controllers[0]
    assert isinstance(ctl, LoraFAController)
    x = np.random.default_rng(4).standard_normal((5, 5))
    y = pm.forward(x)
    pm.zero_grad()
    pm.backward(np.ones_like(y))
    raw = {n: m.grads[B_KEY].copy() for n, m in pm.adapter_layers()}
    ctl.after_backward(1)
    for n, m in pm.adapter_layers():
        A = m.params[A_KEY]
        # least squares: (1/s²) g_B (A Aᵀ)⁻¹ written with an explicit solve
        want = np.linalg.solve(A @ A.T + 1e-8 * np.eye(2), raw[n].T).T / m.scaling ** 2
        assert_close(m.grads[B_KEY], want, f"corrected g_B of {n}", 1e-10)


def test_lorafa_peft_optimizer_reference():
    """PEFT's LoraFAOptimizer takes one AdamW step with the corrected gradient: our corrected g_B fed
    to the same AdamW arithmetic gives the same B."""
    pytest.importorskip("peft", reason="peft: the PEFT peer these comparisons run against")
    from peft.optimizers.lorafa import LoraFAOptimizer

    from spectral_peft.adapters.lorafa import corrected_gradient

    rng = np.random.default_rng(5)
    A, B, gB = rng.standard_normal((3, 7)), rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    s = 2.0
    tA = torch.nn.Parameter(torch.tensor(A), requires_grad=False)
    tB = torch.nn.Parameter(torch.tensor(B))
    tB.grad = torch.tensor(gB)
    opt = LoraFAOptimizer([{"params": [tA, tB], "names": ["x.lora_A", "x.lora_B"], "scaling_factors": [s, s]}],
                          lr=0.1, eps=1e-6)
    import peft.optimizers.lorafa as lf
    old = lf.is_bf16_available
    lf.is_bf16_available = lambda *a, **k: False  # full precision, as the engine computes it
    try:
        opt.step()
    finally:
        lf.is_bf16_available = old
    g = corrected_gradient(gB, A, s)
    # AdamW's first step with bias correction: B - lr · ĝ/(|ĝ| + eps') with PEFT's eps placement
    m1, v1 = 0.1 * g, 0.001 * g * g
    step = 0.1 * np.sqrt(1 - 0.999) / (1 - 0.9)
    want = B - step * m1 / (np.sqrt(v1) + 1e-6)
    assert_close(tB.detach().numpy(), want, "B after PEFT's LoRA-FA step", 1e-10)


def test_lorafa_refuses_dora():
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        LoraFAConfig(target_modules=["a"], use_dora=True)


def test_lora_config_still_trains_A():
    pm = get_peft_model(TwoLinear(), LoraConfig(r=2, target_modules=["a"]))
    assert A_KEY not in pm.model.a.frozen
