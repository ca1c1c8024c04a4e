"""The layer contract: naming, freezing, gradient accumulation, Linear's backward, target matching."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spectral_peft.adapters.base import inject_adapters, match_target_modules
from spectral_peft.backend import get_backend, to_host
from spectral_peft.module import Linear, Module, ModuleList
from spectral_peft.testing import RTOL, assert_close, check_module_gradients


class Block(Module):
    def __init__(self, rng):
        super().__init__()
        self.attn = Linear(rng.standard_normal((4, 4)), rng.standard_normal(4))
        self.mlp = Linear(rng.standard_normal((4, 4)))


class Net(Module):
    def __init__(self, rng):
        super().__init__()
        self.h = ModuleList([Block(rng) for _ in range(2)])
        self.head = Linear(rng.standard_normal((3, 4)))


def test_dotted_names_follow_attribute_paths():
    net = Net(np.random.default_rng(0))
    names = [n for n, _, _ in net.named_parameters()]
    assert names == ["h.0.attn.weight", "h.0.attn.bias", "h.0.mlp.weight", "h.1.attn.weight", "h.1.attn.bias",
                     "h.1.mlp.weight", "head.weight"]
    assert net.num_parameters() == 2 * (16 + 4 + 16) + 12


def test_shared_array_is_listed_once():
    tied = Net(np.random.default_rng(0))
    tied.head = Linear(tied.h[0].mlp.params["weight"])
    assert "head.weight" not in [n for n, _, _ in tied.named_parameters()]
    assert tied.num_parameters() == 2 * (16 + 4 + 16)


def test_freeze_skips_gradients_and_zero_grad_zeroes():
    rng = np.random.default_rng(1)
    lin = Linear(rng.standard_normal((3, 5)), rng.standard_normal(3))
    x = rng.standard_normal((4, 5))
    lin.freeze("weight")
    lin.forward(x)
    assert lin.activation_bytes() == 0  # a frozen weight needs no cached input
    lin.backward(np.ones((4, 3)))
    assert "weight" not in lin.grads
    np.testing.assert_array_equal(lin.grads["bias"], np.full(3, 4.0))
    lin.forward(x)
    lin.backward(np.ones((4, 3)))
    np.testing.assert_array_equal(lin.grads["bias"], np.full(3, 8.0))  # accumulates with +=
    lin.zero_grad()
    np.testing.assert_array_equal(lin.grads["bias"], np.zeros(3))


def test_freeze_unknown_name_is_refused():
    lin = Linear(np.zeros((2, 2)))
    with pytest.raises(KeyError, match="has no parameter 'bias'"):
        lin.freeze("bias")


def test_linear_rejects_bad_shapes():
    with pytest.raises(ValueError, match="must be 2-D"):
        Linear(np.zeros(3))
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
        Linear(np.zeros((2, 3)), np.zeros(3))
    with pytest.raises(ValueError, match=r"expects inputs \(\.\.\., 3\)"):
        Linear(np.zeros((2, 3))).forward(np.zeros((4, 2)))


@given(n=st.integers(1, 4), d_in=st.integers(1, 5), d_out=st.integers(1, 5), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_linear_gradients_match_central_differences(n, d_in, d_out, bias, seed):
    rng = np.random.default_rng(seed)
    lin = Linear(rng.standard_normal((d_out, d_in)), rng.standard_normal(d_out) if bias else None)
    check_module_gradients(lin, [rng.standard_normal((2, n, d_in))], seed=seed)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_linear_matches_torch(device, dtype):
    b = get_backend(device, dtype)
    rng = np.random.default_rng(2)
    W, bias, x, g = rng.standard_normal((6, 5)), rng.standard_normal(6), rng.standard_normal((3, 4, 5)), \
        rng.standard_normal((3, 4, 6))
    lin = Linear(b.asarray(W), b.asarray(bias))
    y = lin.forward(b.asarray(x))
    dx = lin.backward(b.asarray(g))
    tt = {k: torch.tensor(v, dtype=getattr(torch, dtype), requires_grad=True) for k, v in
          dict(W=W, b=bias, x=x).items()}
    ty = torch.nn.functional.linear(tt["x"], tt["W"], tt["b"])
    ty.backward(torch.tensor(g, dtype=getattr(torch, dtype)))
    rtol = RTOL[dtype]
    assert_close(to_host(y), ty.detach().numpy(), "y", rtol)
    assert_close(to_host(dx), tt["x"].grad.numpy(), "dx", rtol)
    assert_close(to_host(lin.grads["weight"]), tt["W"].grad.numpy(), "dW", rtol)
    assert_close(to_host(lin.grads["bias"]), tt["b"].grad.numpy(), "db", rtol)


def test_target_matching_follows_peft_rules():
    net = Net(np.random.default_rng(0))
    assert match_target_modules(net, ["attn"]) == ["h.0.attn", "h.1.attn"]
    assert match_target_modules(net, r"h\.1\..*") == ["h.1.attn", "h.1.mlp"]
    with pytest.raises(ValueError, match=r"\['nope'\] match no linear layer; the linear layers are named "
                                         r"\['attn', 'head', 'mlp'\]"):
        match_target_modules(net, ["attn", "nope"])
    with pytest.raises(ValueError, match="matches no linear layer"):
        match_target_modules(net, "q_proj")


class Wrapper(Module):
    def __init__(self, base):
        super().__init__()
        self.base_layer = base


def test_injection_is_all_or_nothing():
    net = Net(np.random.default_rng(0))
    before = dict(net.named_modules())

    def failing(path, base):
        if path == "h.1.mlp":
            raise ValueError("bad rank")
        return Wrapper(base)

    with pytest.raises(ValueError, match="bad rank"):
        inject_adapters(net, ["attn", "mlp"], failing)
    assert dict(net.named_modules()) == before
    assert all(k not in m.frozen for _, m, k in net.named_parameters())
    paths = inject_adapters(net, ["mlp"], lambda p, base: Wrapper(base))
    assert paths == ["h.0.mlp", "h.1.mlp"]
    assert isinstance(net.get_submodule("h.0.mlp"), Wrapper)
    assert net.num_parameters(trainable_only=True) == 0
