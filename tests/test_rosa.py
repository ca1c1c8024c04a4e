"""RosaLinear: gradients, the dense-masked formulation, PyTorch parity, budgets, collection, files, errors.

The dense-masked formulation used as the expected value everywhere is written out in this file:
    y = x (W + M ⊙ S)ᵀ + b + s · (x Aᵀ) Bᵀ,   dS = (dYᵀ X) ⊙ M.
"""
import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from spectral_peft.adapters.rosa import (A_KEY, B_KEY, COL_IDX_KEY, ROW_OFFS_KEY, VALUES_KEY, RosaConfig,
                                         RosaLinear)
from spectral_peft.backend import get_backend, to_host
from spectral_peft.module import Linear
from spectral_peft.testing import RTOL, assert_close, check_module_gradients


def make_layer(be, d_out, d_in, r, d, seed=0, impl="sp_add", bias=True, init=False, sddmm_impl="planned",
               support=True, alpha=None):
    """A RosaLinear over a frozen random base; with ``support`` a random support of exactly nnz
    entries and random values (so every branch contributes)."""
    rng = np.random.default_rng(seed)
    W = be.asarray(rng.standard_normal((d_out, d_in)))
    b = be.asarray(rng.standard_normal(d_out)) if bias else None
    base = Linear(W, b)
    base.freeze_all()
    layer = RosaLinear(base, r=r, d=d, lora_alpha=alpha if alpha is not None else 2 * max(r, 1), impl=impl,
                       init_lora_weights=init, sddmm_impl=sddmm_impl, rng=rng)
    mask = None
    if support and d > 0:
        k = int(d * (d_out * d_in))  # peft-rosa: int(density · numel)
        flat = np.zeros(d_out * d_in, dtype=bool)
        flat[rng.choice(flat.size, k, replace=False)] = True
        mask = flat.reshape(d_out, d_in)
        layer.set_support(be.asarray(mask))
        layer.params[VALUES_KEY][...] = be.asarray(rng.standard_normal(k))
    return layer, mask, rng


def dense_masked_reference(layer, mask, x, dy):
    """y, dx, dA, dB, dvalues of the dense-masked formulation, in float64 NumPy."""
    W = to_host(layer.base_layer.params["weight"]).astype(np.float64)
    b = layer.base_layer.params.get("bias")
    S = np.zeros_like(W)
    if mask is not None:
        S[np.nonzero(mask)] = to_host(layer.params[VALUES_KEY])
    y = x @ (W + S).T + (0 if b is None else to_host(b))
    dx = dy @ (W + S)
    out = {"y": y, "dx": dx}
    if layer.r:
        A, B, s = to_host(layer.params[A_KEY]), to_host(layer.params[B_KEY]), layer.scaling
        y += s * (x @ A.T) @ B.T
        dx += s * (dy @ B) @ A
        out["dA"] = s * (dy @ B).T @ x
        out["dB"] = s * dy.T @ (x @ A.T)
    if mask is not None:
        out["dvalues"] = (dy.T @ x)[np.nonzero(mask)]
    return out


shapes = st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(0, 3), st.integers(1, 4))
densities = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))


@given(shape=shapes, d=densities, impl=st.sampled_from(["sp_add", "spmm"]), seed=st.integers(0, 2**16),
       bias=st.booleans())
@example(shape=(3, 4, 2, 3), d=0.0, impl="sp_add", seed=1, bias=True)
@example(shape=(3, 4, 2, 3), d=1.0, impl="sp_add", seed=2, bias=True)
@example(shape=(4, 3, 0, 2), d=1.0, impl="spmm", seed=3, bias=False)
def test_rosa_layer_gradients(shape, d, impl, seed, bias):
    d_out, d_in, r, N = shape
    layer, _, rng = make_layer(get_backend("cpu", "float64"), d_out, d_in, r, d, seed, impl=impl, bias=bias)
    x = rng.standard_normal((N, d_in))
    check_module_gradients(layer, [x], seed=seed)


@given(shape=shapes, d=densities, impl=st.sampled_from(["sp_add", "spmm"]),
       sddmm_impl=st.sampled_from(["planned", "auto", "gather", "dense"]), seed=st.integers(0, 2**16))
@example(shape=(4, 5, 2, 3), d=0.0, impl="sp_add", sddmm_impl="planned", seed=1)
@example(shape=(4, 5, 2, 3), d=1.0, impl="spmm", sddmm_impl="planned", seed=2)
def test_sparse_equals_dense_masked(shape, d, impl, sddmm_impl, seed):
    """Every implementation (sp_add/spmm × the four SDDMMs) equals the dense-masked formulation."""
    d_out, d_in, r, N = shape
    layer, mask, rng = make_layer(get_backend("cpu", "float64"), d_out, d_in, r, d, seed, impl=impl,
                                  sddmm_impl=sddmm_impl)
    x = rng.standard_normal((2, N, d_in))
    dy = rng.standard_normal((2, N, d_out))
    ref = dense_masked_reference(layer, mask, x.reshape(-1, d_in), dy.reshape(-1, d_out))
    layer.zero_grad()
    y = layer.forward(x)
    dx = layer.backward(dy)
    assert_close(y.reshape(-1, d_out), ref["y"], "y", rtol=1e-12)
    assert_close(dx.reshape(-1, d_in), ref["dx"], "dx", rtol=1e-12)
    if r:
        assert_close(layer.grads[A_KEY], ref["dA"], "dA", rtol=1e-12)
        assert_close(layer.grads[B_KEY], ref["dB"], "dB", rtol=1e-12)
    if mask is not None:
        assert_close(layer.grads[VALUES_KEY], ref["dvalues"], "dvalues", rtol=1e-12)


@pytest.mark.parametrize("impl", ["sp_add", "spmm"])
def test_torch_autograd_parity(backend, impl):
    """The torch dense-masked formulation (autograd) against the layer, float64 and float32."""
    d_out, d_in, r, N = 12, 10, 3, 14
    layer, mask, rng = make_layer(backend, d_out, d_in, r, 0.2, seed=7, impl=impl)
    x = rng.standard_normal((2, N // 2, d_in))
    dy = rng.standard_normal((2, N // 2, d_out))
    tdt = torch.float64 if backend.dtype == "float64" else torch.float32

    def t(a, grad=False):
        return torch.tensor(np.asarray(to_host(a), dtype=np.float64), dtype=tdt, requires_grad=grad)

    xt = t(x, True)
    W, b = t(layer.base_layer.params["weight"]), t(layer.base_layer.params["bias"])
    A, B = t(layer.params[A_KEY], True), t(layer.params[B_KEY], True)
    S = torch.zeros(d_out, d_in, dtype=tdt)
    S[torch.from_numpy(mask)] = t(layer.params[VALUES_KEY])
    S.requires_grad_(True)
    M = torch.from_numpy(mask).to(tdt)
    yt = xt @ (W + M * S).T + b + layer.scaling * (xt @ A.T) @ B.T
    yt.backward(t(dy))
    layer.zero_grad()
    y = layer.forward(backend.asarray(x))
    dx = layer.backward(backend.asarray(dy))
    rtol = RTOL[backend.dtype]
    assert_close(y, yt.detach().numpy(), "y", rtol=rtol)
    assert_close(dx, xt.grad.numpy(), "dx", rtol=rtol)
    assert_close(layer.grads[A_KEY], A.grad.numpy(), "dA", rtol=rtol)
    assert_close(layer.grads[B_KEY], B.grad.numpy(), "dB", rtol=rtol)
    assert_close(layer.grads[VALUES_KEY], S.grad[torch.from_numpy(mask)].numpy(), "dvalues", rtol=rtol)


def test_dropout_branch_matches_torch_with_the_same_mask():
    be = get_backend("cpu", "float64")
    d_out, d_in, r, N = 6, 5, 2, 8
    rng = np.random.default_rng(1)
    base = Linear(rng.standard_normal((d_out, d_in)))
    base.freeze_all()
    layer = RosaLinear(base, r=r, d=0.3, lora_alpha=4, lora_dropout=0.4, init_lora_weights=False, rng=rng)
    layer.set_support(_first_k_mask((d_out, d_in), layer.nnz))
    layer.params[VALUES_KEY][...] = rng.standard_normal(layer.nnz)
    x = rng.standard_normal((N, d_in))
    dy = rng.standard_normal((N, d_out))
    y = layer.forward(x)
    keep, scale = layer.cache[2]
    dx = layer.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    S = torch.tensor(to_host(layer.spa.to_dense()))
    xd = xt * torch.tensor(keep) * scale
    yt = xt @ (torch.tensor(base.params["weight"]) + S).T + layer.scaling * (
        xd @ torch.tensor(layer.params[A_KEY]).T) @ torch.tensor(layer.params[B_KEY]).T
    yt.backward(torch.tensor(dy))
    assert_close(y, yt.detach().numpy(), "y", rtol=1e-12)
    assert_close(dx, xt.grad.numpy(), "dx", rtol=1e-12)
    assert be.dtype == "float64"


def _first_k_mask(shape, k):
    m = np.zeros(shape[0] * shape[1], dtype=bool)
    m[:k] = True
    return m.reshape(shape)


@given(shape=shapes, d=densities, impl=st.sampled_from(["sp_add", "spmm"]), seed=st.integers(0, 2**16))
def test_init_output_equals_base_and_counts(shape, d, impl, seed):
    """At initialisation (B = 0, values = 0 on a freshly set support) the output IS the base output;
    nnz = int(d·numel); trainable parameters = r·(d_in + d_out) + nnz."""
    d_out, d_in, r, N = shape
    be = get_backend("cpu", "float64")
    layer, mask, rng = make_layer(be, d_out, d_in, r, d, seed, impl=impl, init=True, support=False)
    x = rng.standard_normal((N, d_in))
    base_y = x @ layer.base_layer.params["weight"].T + layer.base_layer.params["bias"]
    np.testing.assert_array_equal(layer.forward(x), base_y)
    assert layer.nnz == int(d * (d_out * d_in))
    if d > 0:
        layer.set_support(_first_k_mask((d_out, d_in), layer.nnz))
        np.testing.assert_array_equal(layer.forward(x), base_y)
        assert layer.spa.nnz == int(d * (d_out * d_in))
    assert layer.num_parameters(trainable_only=True) == r * (d_in + d_out) + (int(d * (d_out * d_in)) if d > 0 else 0)


@pytest.mark.parametrize("mode", ["mean_squared", "mean"])
def test_collection_and_support_selection(mode):
    """Collected scores are mean(G²) or |mean(G)| over the batches; the support keeps exactly
    int(d·numel) entries, the largest, ties to the smaller row-major index."""
    be = get_backend("cpu", "float64")
    layer, _, rng = make_layer(be, 6, 5, 2, 0.3, seed=2, support=False)
    layer.grad_acc_mode = mode
    Gs = []
    layer.collecting = True
    for _ in range(3):
        x = rng.standard_normal((4, 5))
        dy = rng.standard_normal((4, 6))
        layer.forward(x)
        layer.backward(dy)
        layer.commit_collection()  # each step taken (the controller commits in after_optimizer_step)
        Gs.append(dy.T @ x)
    expected = np.mean([G**2 for G in Gs], axis=0) if mode == "mean_squared" else np.abs(np.mean(Gs, axis=0))
    assert_close(layer.collected_scores(), expected, "collected", rtol=1e-12)
    mask = layer.select_support()
    k = int(0.3 * 30)
    assert mask.sum() == k
    order = sorted(range(30), key=lambda i: -expected.reshape(-1)[i])
    np.testing.assert_array_equal(np.flatnonzero(mask.reshape(-1)), np.sort(order[:k]))


def test_support_tie_break_is_smaller_index_first():
    be = get_backend("cpu", "float64")
    layer, _, _ = make_layer(be, 2, 3, 1, 0.5, support=False)  # nnz = 3
    layer.grad_sum = np.array([[1.0, 2.0, 1.0], [2.0, 1.0, 1.0]])
    layer.grad_count = 1
    mask = layer.select_support()
    np.testing.assert_array_equal(mask, [[True, True, False], [True, False, False]])


def test_bad_inputs_get_clear_errors():
    be = get_backend("cpu", "float64")
    base = Linear(np.zeros((4, 3)))
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match=r"d \(the density of the sparse adapter\) must lie in \[0, 1\]"):
            RosaConfig(target_modules=["fc"], d=bad, schedule="wl0")
        with pytest.raises(ValueError, match="must lie in"):
            RosaLinear(base, r=1, d=bad)
    with pytest.raises(ValueError, match=r"density_pattern\['fc'\]"):
        RosaConfig(target_modules=["fc"], density_pattern={"fc": 2.0}, schedule="wl0")
    with pytest.raises(ValueError, match="zero batches"):
        RosaConfig(target_modules=["fc"], spa_num_grads=0, schedule="wl0")
    layer, _, _ = make_layer(be, 4, 3, 1, 0.5, support=False)
    with pytest.raises(ValueError, match="collected over zero batches"):
        layer.select_support()
    with pytest.raises(ValueError, match=r"support mask has shape \(3, 4\) but the layer's weight is \(4, 3\)"):
        layer.set_support(np.ones((3, 4), dtype=bool))
    with pytest.raises(ValueError, match="has 12 entries but the layer keeps exactly nnz"):
        layer.set_support(np.ones((4, 3), dtype=bool))
    with pytest.raises(ValueError, match="schedule must be set"):
        RosaConfig(target_modules=["fc"])
    with pytest.raises(ValueError, match="unknown schedule 'warmup'"):
        RosaConfig(target_modules=["fc"], schedule="warmup")
    with pytest.raises(ValueError, match="impl must be one of"):
        RosaConfig(target_modules=["fc"], schedule="wl0", impl="dense")


def test_adapter_arrays_round_trip_and_reject_bad_shapes(tmp_path):
    from safetensors.numpy import load_file, save_file

    be = get_backend("cpu", "float64")
    layer, mask, rng = make_layer(be, 6, 5, 2, 0.3, seed=4)
    arrays = layer.peft_state_dict()
    assert arrays[ROW_OFFS_KEY].dtype == np.int32 and arrays[COL_IDX_KEY].dtype == np.int16
    save_file(arrays, str(tmp_path / "a.safetensors"))
    loaded = load_file(str(tmp_path / "a.safetensors"))
    fresh, _, _ = make_layer(be, 6, 5, 2, 0.3, seed=5, support=False)
    fresh.base_layer.params["weight"][...] = layer.base_layer.params["weight"]
    fresh.base_layer.params["bias"][...] = layer.base_layer.params["bias"]
    fresh.load_peft_state_dict(loaded)
    np.testing.assert_array_equal(fresh.support_mask(), mask)
    x = rng.standard_normal((3, 5))
    np.testing.assert_array_equal(fresh.forward(x), layer.forward(x))
    # a wrong shape: a clear error, and nothing installed
    other, _, _ = make_layer(be, 6, 5, 2, 0.3, seed=6, support=False)
    before = {k: v.copy() for k, v in other.params.items()}
    bad = dict(loaded)
    bad[COL_IDX_KEY] = bad[COL_IDX_KEY][:-1]
    with pytest.raises(ValueError, match=r"rosa_spa.col_idx: shape \(8,\) does not fit this layer, expected \(9,\)"):
        other.load_peft_state_dict(bad)
    bad = dict(loaded)
    bad[A_KEY] = np.ones((3, 5))
    with pytest.raises(ValueError, match="rosa_A.weight: shape"):
        other.load_peft_state_dict(bad)
    for k, v in before.items():
        np.testing.assert_array_equal(other.params[k], v)
    assert other.spa is None
