"""The shared low-rank branch y = s·(x Aᵀ)Bᵀ: central differences and PyTorch parity."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spectral_peft.backend import get_backend, to_host
from spectral_peft.ops.lowrank import lowrank_backward, lowrank_forward
from spectral_peft.testing import GRADCHECK_RTOL, RTOL, assert_close, numerical_gradient


@given(n=st.integers(1, 4), d_in=st.integers(1, 5), d_out=st.integers(1, 5), r=st.integers(1, 3),
       scale=st.floats(0.1, 4.0), seed=st.integers(0, 2**16))
def test_lowrank_gradients_match_central_differences(n, d_in, d_out, r, scale, seed):
    rng = np.random.default_rng(seed)
    x, A, B = rng.standard_normal((n, d_in)), rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r))
    G = rng.standard_normal((n, d_out))
    _, cache = lowrank_forward(x, A, B, scale)
    dx, dA, dB = lowrank_backward(G, cache, A, B, scale)

    def loss():
        return float(np.sum(lowrank_forward(x, A, B, scale)[0] * G))

    for name, analytic, wrt in (("dx", dx, x), ("dA", dA, A), ("dB", dB, B)):
        assert_close(analytic, numerical_gradient(loss, wrt), name, GRADCHECK_RTOL)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_lowrank_matches_torch(device, dtype):
    b = get_backend(device, dtype)
    rng = np.random.default_rng(0)
    x, A, B, G = (rng.standard_normal(s) for s in [(2, 7, 6), (3, 6), (5, 3), (2, 7, 5)])
    y, cache = lowrank_forward(b.asarray(x), b.asarray(A), b.asarray(B), 2.5)
    dx, dA, dB = lowrank_backward(b.asarray(G), cache, b.asarray(A), b.asarray(B), 2.5)
    t = {k: torch.tensor(v, dtype=getattr(torch, dtype), requires_grad=True) for k, v in dict(x=x, A=A, B=B).items()}
    ty = 2.5 * (t["x"] @ t["A"].T) @ t["B"].T
    ty.backward(torch.tensor(G, dtype=getattr(torch, dtype)))
    for name, mine, theirs in (("y", y, ty), ("dx", dx, t["x"].grad), ("dA", dA, t["A"].grad),
                               ("dB", dB, t["B"].grad)):
        assert_close(to_host(mine), theirs.detach().numpy(), name, RTOL[dtype])


def test_lowrank_without_x_keeps_only_the_rank_r_product():
    rng = np.random.default_rng(0)
    x, A, B = rng.standard_normal((10, 6)), rng.standard_normal((2, 6)), rng.standard_normal((4, 2))
    _, cache = lowrank_forward(x, A, B, 1.0, keep_x=False)
    assert cache[0] is None and cache[1].shape == (10, 2)
    dx, dA, dB = lowrank_backward(np.ones((10, 4)), cache, A, B, 1.0, need_dA=False)
    assert dA is None and dB.shape == (4, 2) and dx.shape == (10, 6)
    with pytest.raises(RuntimeError, match="did not keep x"):
        lowrank_backward(np.ones((10, 4)), cache, A, B, 1.0)
