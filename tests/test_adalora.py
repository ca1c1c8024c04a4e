"""AdaLoRA's triplet layer and orthogonal regulariser: gradients, torch parity, invariants, config errors.

The torch references below are written from PEFT's SVDLinear.forward and AdaLoraModel.forward
(peft 0.21.2): result += (dropout(x) @ (A * E).T @ B.T) * scaling / (ranknum + 1e-5) and
R = mean over all lora_A / lora_B of torch.norm(p pᵀ − I or pᵀ p − I, "fro").
"""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spectral_peft.adapters.adalora import (
    AdaLoraConfig,
    AdaLoraLinear,
    orth_penalty_backward,
    orth_penalty_forward,
    orth_regularizer,
)
from spectral_peft.backend import to_host
from spectral_peft.module import Linear
from spectral_peft.testing import RTOL, assert_close, check_module_gradients, numerical_gradient


def make_layer(backend, d_in, d_out, r, seed=0, alpha=8.0, ranknum=None, dropout=0.0, nonzero_E=True):
    rng = np.random.default_rng(seed)
    W = backend.asarray(rng.standard_normal((d_out, d_in)))
    b = backend.asarray(rng.standard_normal(d_out))
    base = Linear(W, b)
    base.freeze_all()
    layer = AdaLoraLinear(base, r=r, lora_alpha=alpha, ranknum=r if ranknum is None else ranknum,
                          lora_dropout=dropout, rng=rng)
    if nonzero_E:  # PEFT's init (E = 0, A, B ~ N(0, 0.02)) would hide dA, dB and shrink dE to
        # rounding-noise size: draw all three ~ N(0, 1) for the checks
        for k in ("lora_A", "lora_E", "lora_B"):
            layer.params[k][...] = backend.asarray(rng.standard_normal(layer.params[k].shape))
    return layer


def torch_forward(layer, x, keep=None, p=0.0):
    """PEFT's SVDLinear.forward in torch, on the layer's current values."""
    t = {k: torch.tensor(to_host(v), requires_grad=True) for k, v in layer.params.items()}
    W = torch.tensor(to_host(layer.base_layer.params["weight"]))
    bias = torch.tensor(to_host(layer.base_layer.params["bias"]))
    xt = torch.tensor(to_host(x), requires_grad=True)
    xd = xt if keep is None else xt * torch.tensor(to_host(keep)) / (1 - p)
    scaling = layer.lora_alpha if layer.lora_alpha > 0 else float(layer.r)
    y = xt @ W.T + bias + (xd @ (t["lora_A"] * t["lora_E"]).T @ t["lora_B"].T) * scaling / (layer.ranknum + 1e-5)
    return y, t, xt


# --- the layer -------------------------------------------------------------------------------------
@given(d_in=st.integers(1, 4), d_out=st.integers(1, 4), r=st.integers(1, 3), n=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_layer_gradients_central_differences(d_in, d_out, r, n, seed):
    from spectral_peft.backend import get_backend
    layer = make_layer(get_backend("cpu", "float64"), d_in, d_out, r, seed=seed)
    x = np.random.default_rng(seed + 1).standard_normal((n, d_in))
    check_module_gradients(layer, [x], seed=seed, rtol=1e-6)


def test_layer_matches_torch_autograd(backend):
    layer = make_layer(backend, d_in=7, d_out=5, r=3, seed=3, alpha=16.0)
    rng = np.random.default_rng(4)
    x = backend.asarray(rng.standard_normal((2, 4, 7)))
    G = rng.standard_normal((2, 4, 5))
    y = layer.forward(x)
    layer.zero_grad()
    dx = layer.backward(backend.asarray(G))
    yt, t, xt = torch_forward(layer, x)
    (yt * torch.tensor(G)).sum().backward()
    rtol = RTOL[backend.dtype]
    assert_close(y, yt.detach().numpy(), "y", rtol)
    assert_close(dx, xt.grad.numpy(), "dx", rtol)
    for k in ("lora_A", "lora_E", "lora_B"):
        assert_close(layer.grads[k], t[k].grad.numpy(), f"d{k}", rtol)
    assert "weight" not in layer.base_layer.grads  # the base stays frozen


def test_layer_dropout_matches_torch_with_the_same_mask(backend64):
    layer = make_layer(backend64, d_in=6, d_out=4, r=2, seed=5, dropout=0.3)
    rng = np.random.default_rng(6)
    x = backend64.asarray(rng.standard_normal((5, 6)))
    G = rng.standard_normal((5, 4))
    y = layer.forward(x)
    keep = layer.cache[1][0]  # the dropout mask the forward drew
    assert not bool(keep.all())
    layer.zero_grad()
    dx = layer.backward(backend64.asarray(G))
    yt, t, xt = torch_forward(layer, x, keep=keep, p=0.3)
    (yt * torch.tensor(G)).sum().backward()
    assert_close(y, yt.detach().numpy(), "y", 1e-10)
    assert_close(dx, xt.grad.numpy(), "dx", 1e-10)
    for k in ("lora_A", "lora_E", "lora_B"):
        assert_close(layer.grads[k], t[k].grad.numpy(), f"d{k}", 1e-10)
    layer.eval()
    assert_close(layer.forward(x), torch_forward(layer, x)[0].detach().numpy(), "y (eval: no dropout)", 1e-10)


def test_init_is_peft_init_and_output_starts_at_base(backend64):
    rng = np.random.default_rng(0)
    base = Linear(backend64.asarray(rng.standard_normal((300, 200))))
    layer = AdaLoraLinear(base, r=12, lora_alpha=8, ranknum=12, rng=np.random.default_rng(1))
    A, E, B = (to_host(layer.params[k]) for k in ("lora_A", "lora_E", "lora_B"))
    assert A.shape == (12, 200) and E.shape == (12, 1) and B.shape == (300, 12)
    assert np.all(E == 0)
    # N(0, 0.02): sample std of 2400 / 3600 draws within 10% of 0.02
    assert abs(A.std() - 0.02) < 0.002 and abs(B.std() - 0.02) < 0.002
    x = backend64.asarray(rng.standard_normal((3, 200)))
    assert_close(layer.forward(x), base.forward(x), "y at init", 1e-15)
    # scale = lora_alpha / (init_r + 1e-5), PEFT's
    assert layer.scale == 8 / (12 + 1e-5)
    zero_alpha = AdaLoraLinear(base, r=5, lora_alpha=0, ranknum=12, rng=np.random.default_rng(1))
    assert zero_alpha.scale == 5 / (12 + 1e-5)


def test_parameter_count_before_and_after_resizing(backend64):
    layer = make_layer(backend64, d_in=9, d_out=6, r=5)
    assert layer.num_parameters(trainable_only=True) == 5 * (9 + 6 + 1)
    keep = [True, False, True, True, False]
    layer.resize(keep)
    assert layer.r == 3
    assert layer.num_parameters(trainable_only=True) == 3 * (9 + 6 + 1)
    layer.resize([False, False, False])  # rank 0 is allowed (PEFT #1539)
    assert layer.num_parameters(trainable_only=True) == 0
    x = backend64.asarray(np.random.default_rng(0).standard_normal((2, 9)))
    assert_close(layer.forward(x), layer.base_layer.forward(x), "rank-0 output", 1e-15)


def test_masked_triplets_contribute_nothing(backend64):
    layer = make_layer(backend64, d_in=8, d_out=7, r=4, seed=2)
    x = backend64.asarray(np.random.default_rng(3).standard_normal((5, 8)))
    keep = np.array([False, True, False, True])
    A, E, B = (to_host(layer.params[k]).copy() for k in ("lora_A", "lora_E", "lora_B"))
    layer.apply_mask(keep)
    assert layer.pattern == [False, True, False, True]
    y = to_host(layer.forward(x))
    W = to_host(layer.base_layer.params["weight"])
    bias = to_host(layer.base_layer.params["bias"])
    idx = [1, 3]
    xh = to_host(x)
    expected = xh @ W.T + bias + (xh @ (A[idx] * E[idx]).T @ B[:, idx].T) * (8.0 / (4 + 1e-5))
    assert_close(y, expected, "masked output", 1e-12)


def test_resize_keeps_the_output_of_the_masked_layer(backend64):
    layer = make_layer(backend64, d_in=6, d_out=5, r=4, seed=9)
    x = backend64.asarray(np.random.default_rng(1).standard_normal((3, 6)))
    keep = [True, False, False, True]
    layer.apply_mask(keep)
    y_masked = to_host(layer.forward(x)).copy()
    layer.resize(keep)
    assert layer.ranknum == 4.0  # fixed: the scale does not change
    assert_close(layer.forward(x), y_masked, "resized output", 1e-13)


# --- the regulariser -------------------------------------------------------------------------------
def _peft_orth(As, Bs, weight, squared=False):
    """PEFT's AdaLoraModel.forward regulariser (or the paper's squared sum) in torch."""
    total, count = 0.0, 0
    for p in list(As) + list(Bs):
        is_A = any(p is a for a in As)
        cov = p @ p.T if is_A else p.T @ p
        eye = torch.eye(*cov.size(), dtype=cov.dtype)
        nrm = torch.norm(cov - eye, p="fro")
        total = total + (nrm ** 2 if squared else nrm)
        count += 1
    return weight * (total if squared else total / count)



@pytest.mark.parametrize("form", ["peft", "paper"])
def test_regulariser_matches_torch_autograd(backend, form):
    layers = [make_layer(backend, 7, 5, 3, seed=1), make_layer(backend, 4, 6, 2, seed=2),
              make_layer(backend, 5, 5, 0, seed=3)]  # a rank-0 layer counts in the mean, as in PEFT
    for m in layers:
        m.zero_grad()
    value = orth_regularizer(layers, 0.7, form)
    As = [torch.tensor(to_host(m.params["lora_A"]), requires_grad=True) for m in layers]
    Bs = [torch.tensor(to_host(m.params["lora_B"]), requires_grad=True) for m in layers]
    ref = _peft_orth(As, Bs, 0.7, squared=(form == "paper"))
    ref.backward()
    rtol = RTOL[backend.dtype]
    assert_close(np.array(value), ref.detach().numpy(), "R", rtol)
    for i, m in enumerate(layers):
        assert_close(m.grads["lora_A"], As[i].grad.numpy(), f"dA[{i}]", rtol)
        assert_close(m.grads["lora_B"], Bs[i].grad.numpy(), f"dB[{i}]", rtol)


@given(r=st.integers(1, 3), d_in=st.integers(3, 5), d_out=st.integers(3, 5), seed=st.integers(0, 2**16),
       form=st.sampled_from(["peft", "paper"]))
def test_regulariser_central_differences(r, d_in, d_out, seed, form):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((r, d_in))
    B = rng.standard_normal((d_out, r))
    pA, pB, cache = orth_penalty_forward(A, B, form)
    dA, dB = orth_penalty_backward(1.0, 1.0, cache, A, B)
    num_A = numerical_gradient(lambda: orth_penalty_forward(A, B, form)[0], A)
    num_B = numerical_gradient(lambda: orth_penalty_forward(A, B, form)[1], B)
    assert_close(dA, num_A, "dA", 1e-6)
    assert_close(dB, num_B, "dB", 1e-6)


def test_regulariser_is_zero_for_orthonormal_P_and_Q():
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((9, 4)))  # (9, 4), orthonormal columns
    P, _ = np.linalg.qr(rng.standard_normal((7, 4)))  # (7, 4)
    for form in ("peft", "paper"):
        pA, pB, cache = orth_penalty_forward(Q.T, P, form)  # A = Qᵀ has orthonormal rows
        assert pA < 1e-14 and pB < 1e-14
    # the squared form is smooth at its minimum: its gradient vanishes there (the non-squared
    # norm's is a unit direction of rounding noise, as in torch)
    dA, dB = orth_penalty_backward(1.0, 1.0, orth_penalty_forward(Q.T, P, "paper")[2], Q.T, P)
    assert np.abs(dA).max() < 1e-12 and np.abs(dB).max() < 1e-12
    # and it is positive otherwise
    assert orth_penalty_forward(2 * Q.T, P)[0] > 1.0


# --- config validation ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    (dict(total_step=None), "total_step"),
    (dict(total_step=0), "total_step"),
    (dict(total_step=10, tinit=8, tfinal=2), "tinit"),
    (dict(total_step=10, target_r=13, init_r=12), "target_r"),
    (dict(total_step=10, beta1=1.0), "beta1"),
    (dict(total_step=10, beta2=-0.1), "beta2"),
    (dict(total_step=10, deltaT=0), "deltaT"),
    (dict(total_step=10, orth_reg_weight=-0.5), "orth_reg_weight"),
    (dict(total_step=10, tie_break="random"), "tie_break"),
])
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdaLoraConfig(target_modules=["q"], **kwargs)


def test_config_defaults_are_peft_defaults():
    c = AdaLoraConfig(target_modules=["q"], total_step=100)
    assert (c.init_r, c.target_r, c.tinit, c.tfinal, c.deltaT) == (12, 8, 0, 0, 1)
    assert (c.beta1, c.beta2, c.orth_reg_weight, c.lora_alpha) == (0.85, 0.85, 0.5, 8)
    c2 = AdaLoraConfig.from_json_dict(c.to_json_dict())
    assert c2 == c


# --- figures ---------------------------------------------------------------------------------------
def test_rank_heatmap_table_and_figures_are_written(tmp_path):
    from spectral_peft.plots.adalora import plot_budget, plot_rank_heatmap, plot_singular_values, rank_matrix
    pattern = {"transformer.h.1.mlp.c_fc.lora_E": [True, True, False],
               "transformer.h.0.mlp.c_fc.lora_E": [False, False, False],
               "transformer.h.0.attn.c_attn.lora_E": [True, False, True]}
    ranks, layers, types = rank_matrix(pattern)
    assert layers == [0, 1] and types == ["attn.c_attn", "mlp.c_fc"]
    assert ranks.tolist() == [[2, 0], [0, 2]]
    plot_rank_heatmap(pattern, tmp_path / "ranks.png")
    plot_budget([0, 1, 2, 3], [6, 5, 4, 4], tmp_path / "budget.png", kept=[6, 5, 4, 4])
    plot_singular_values({"h.0.attn.c_attn": np.array([[0.5], [0.0], [-0.2]])}, tmp_path / "sv.png")
    for name in ("ranks.png", "budget.png", "sv.png"):
        assert (tmp_path / name).stat().st_size > 1000
