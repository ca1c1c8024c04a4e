"""LoRA / rsLoRA layer: central differences, PyTorch autograd parity, init, merge, counts, errors.

Expected values come from PyTorch autograd (an independent implementation of the same equations),
from central differences, or from the equations written out in NumPy in the test itself.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spectral_peft.adapters.base import pattern_value
from spectral_peft.adapters.lora import A_KEY, B_KEY, LoraConfig, LoraLinear
from spectral_peft.adapters.peft_model import merge_and_unload
from spectral_peft.adapters.peft_model import get_peft_model
from spectral_peft.backend import get_backend, to_host
from spectral_peft.module import Linear, Module
from spectral_peft.quant import Linear4bit
from spectral_peft.testing import GRADCHECK_RTOL, RTOL, assert_close, check_module_gradients


class Net(Module):
    """Two linears in a chain: q (d -> h, with bias) then o (h -> k, no bias)."""

    def __init__(self, d=5, h=6, k=4, seed=0, backend=None):
        super().__init__()
        rng = np.random.default_rng(seed)
        b = backend or get_backend("cpu", "float64")
        self.q = Linear(b.asarray(rng.standard_normal((h, d))), b.asarray(rng.standard_normal(h)))
        self.o = Linear(b.asarray(rng.standard_normal((k, h))))

    def forward(self, x):
        return self.o.forward(self.q.forward(x))

    def backward(self, dy):
        return self.q.backward(self.o.backward(dy))


def make_layer(d_in, d_out, r, alpha=3.0, bias=True, seed=0, backend=None, **kw):
    rng = np.random.default_rng(seed)
    b = backend or get_backend("cpu", "float64")
    base = Linear(b.asarray(rng.standard_normal((d_out, d_in))),
                  b.asarray(rng.standard_normal(d_out)) if bias else None)
    base.freeze()
    kw.setdefault("init_lora_weights", False)  # B != 0: every gradient path is exercised
    return LoraLinear(base, r=r, lora_alpha=alpha, rng=np.random.default_rng(seed + 1), **kw)


# --- gradients ------------------------------------------------------------------------------------
@given(n=st.integers(1, 3), d_in=st.integers(1, 5), d_out=st.integers(1, 5), data=st.data(),
       alpha=st.floats(0.5, 16.0), rslora=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_lora_gradients_match_central_differences(n, d_in, d_out, data, alpha, rslora, bias, seed):
    r = data.draw(st.integers(1, min(d_in, d_out)))
    layer = make_layer(d_in, d_out, r, alpha, bias, seed, use_rslora=rslora)
    x = np.random.default_rng(seed + 2).standard_normal((n, 2, d_in))
    check_module_gradients(layer, [x], seed=seed, rtol=GRADCHECK_RTOL)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_torch_autograd(device, dtype, rslora):
    b = get_backend(device, dtype)
    layer = make_layer(7, 6, 3, alpha=5.0, backend=b, use_rslora=rslora)
    rng = np.random.default_rng(9)
    x, G = rng.standard_normal((2, 4, 7)), rng.standard_normal((2, 4, 6))
    y = layer.forward(b.asarray(x))
    dx = layer.backward(b.asarray(G))
    tdt = getattr(torch, dtype)
    W, bias = (torch.tensor(to_host(layer.base_layer.params[k]), dtype=tdt) for k in ("weight", "bias"))
    A = torch.tensor(to_host(layer.params[A_KEY]), dtype=tdt, requires_grad=True)
    B = torch.tensor(to_host(layer.params[B_KEY]), dtype=tdt, requires_grad=True)
    tx = torch.tensor(x, dtype=tdt, requires_grad=True)
    s = 5.0 / math.sqrt(3) if rslora else 5.0 / 3
    ty = tx @ W.T + bias + s * (tx @ A.T) @ B.T
    ty.backward(torch.tensor(G, dtype=tdt))
    for name, mine, theirs in (("y", y, ty), ("dx", dx, tx.grad), ("dA", layer.grads[A_KEY], A.grad),
                               ("dB", layer.grads[B_KEY], B.grad)):
        assert_close(to_host(mine), theirs.detach().numpy(), name, RTOL[dtype])


def test_dropout_branch_matches_torch_with_the_same_mask():
    layer = make_layer(6, 5, 2, lora_dropout=0.3)
    rng = np.random.default_rng(4)
    x, G = rng.standard_normal((8, 6)), rng.standard_normal((8, 5))
    y = layer.forward(x)
    keep, scale = layer.cache[1]
    assert scale == pytest.approx(1 / 0.7) and 0 < keep.mean() < 1
    dx = layer.backward(G)
    W, bias = (torch.tensor(layer.base_layer.params[k]) for k in ("weight", "bias"))
    A = torch.tensor(layer.params[A_KEY], requires_grad=True)
    B = torch.tensor(layer.params[B_KEY], requires_grad=True)
    tx = torch.tensor(x, requires_grad=True)
    xd = tx * torch.tensor(keep) / 0.7
    ty = tx @ W.T + bias + layer.scaling * (xd @ A.T) @ B.T
    ty.backward(torch.tensor(G))
    for name, mine, theirs in (("y", y, ty), ("dx", dx, tx.grad), ("dA", layer.grads[A_KEY], A.grad),
                               ("dB", layer.grads[B_KEY], B.grad)):
        assert_close(mine, theirs.detach().numpy(), name, 1e-12)
    layer.eval()  # evaluation: no dropout, the mask is not drawn
    assert_close(layer.forward(x), x @ W.numpy().T + bias.numpy() + layer.scaling * x @ A.detach().numpy().T
                 @ B.detach().numpy().T, "y_eval", 1e-12)


# --- init -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", [True, "gaussian"])
def test_adapted_output_equals_base_output_exactly_at_init(init):
    net = Net()
    x = np.random.default_rng(1).standard_normal((3, 5))
    base_y = net.forward(x).copy()
    pm = get_peft_model(net, LoraConfig(r=2, lora_alpha=7, target_modules=["q", "o"], init_lora_weights=init))
    assert np.array_equal(pm.forward(x), base_y)


def test_init_distributions_follow_peft():
    rng = np.random.default_rng(0)
    base = Linear(rng.standard_normal((64, 400)))
    lay = LoraLinear(base, r=8, rng=np.random.default_rng(1))
    A = lay.params[A_KEY]
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=√5) on fan_in 400
    assert np.abs(A).max() <= bound and np.abs(A).max() > 0.95 * bound
    assert abs(A.std() - bound / math.sqrt(3)) < 0.05 * bound  # U(-c, c) has std c/√3
    assert not lay.params[B_KEY].any()
    g = LoraLinear(base, r=8, rng=np.random.default_rng(1), init_lora_weights="gaussian").params[A_KEY]
    assert abs(g.std() - 1 / 8) < 0.01  # PEFT: normal_(std=1/r)
    assert torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3 / 400) == pytest.approx(bound)


def test_scaling_lora_and_rslora():
    assert make_layer(5, 5, 4, alpha=16).scaling == 4.0
    assert make_layer(5, 5, 4, alpha=16, use_rslora=True).scaling == 8.0


# --- merge ----------------------------------------------------------------------------------------
def test_merge_unmerge_and_merge_and_unload():
    net = Net()
    W0 = net.q.params["weight"].copy()
    pm = get_peft_model(net, LoraConfig(r=2, lora_alpha=3, target_modules=["q", "o"], init_lora_weights=False))
    x = np.random.default_rng(2).standard_normal((4, 5))
    y = pm.forward(x).copy()
    layer = pm.model.q
    layer.merge()
    pm.model.o.merge()
    assert_close(pm.forward(x), y, "merged output", 1e-12)
    assert_close(layer.base_layer.params["weight"], W0 + layer.scaling * layer.params[B_KEY] @ layer.params[A_KEY],
                 "merged W", 1e-14)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    pm.model.o.unmerge()
    assert_close(layer.base_layer.params["weight"], W0, "unmerged W", 1e-14)
    plain = merge_and_unload(pm)
    assert type(plain.q) is Linear and type(plain.o) is Linear
    assert_close(plain.forward(x), y, "merge_and_unload output", 1e-12)


def test_merged_forward_backward_gives_input_gradient_only():
    layer = make_layer(5, 4, 2)
    x, G = np.ones((3, 5)), np.ones((3, 4))
    y = layer.forward(x).copy()
    layer.backward(G)
    dx_ref = G @ layer.effective_weight()
    layer.zero_grad()
    layer.merge()
    assert_close(layer.forward(x), y, "y merged", 1e-12)
    assert_close(layer.backward(G), dx_ref, "dx merged", 1e-12)
    assert not layer.grads[A_KEY].any() and not layer.grads[B_KEY].any()


# --- counts and patterns ------------------------------------------------------------------------------
def test_trainable_parameter_count_is_r_times_din_plus_dout():
    pm = get_peft_model(Net(d=5, h=6, k=4), LoraConfig(r=3, target_modules=["q", "o"], rank_pattern={"o": 2}))
    assert pm.num_parameters(trainable_only=True) == 3 * (5 + 6) + 2 * (6 + 4)
    assert pm.model.o.r == 2 and pm.model.q.r == 3
    assert sum(m.adapter_parameter_count() for _, m in pm.adapter_layers()) == 3 * 11 + 2 * 10
    # the base is frozen: no base parameter is trainable
    assert all("lora_" in n for n, _, _ in pm.named_parameters(trainable_only=True))


def test_pattern_rule_is_peft_get_pattern_key():
    from peft.utils.other import get_pattern_key  # PEFT's own implementation

    patterns = {"h.0.attn.c_attn": 4, "c_proj": 2, r"h\.1\..*fc": 6}
    for path in ["transformer.h.0.attn.c_attn", "transformer.h.10.attn.c_attn", "transformer.h.1.mlp.c_proj",
                 "transformer.h.1.mlp.c_fc", "c_proj", "transformer.h.2.mlp.c_fc"]:
        key = get_pattern_key(patterns.keys(), path)
        assert pattern_value(patterns, path, 8) == patterns.get(key, 8), path


def test_alpha_pattern_sets_the_scaling_per_module():
    pm = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "o"], alpha_pattern={"o": 10}))
    assert pm.model.q.scaling == 2.0 and pm.model.o.scaling == 5.0


# --- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), r"LoraConfig.r must be an integer > 0, got 0"),
    (dict(r=-2), r"LoraConfig.r must be an integer > 0"),
    (dict(lora_alpha=0), r"LoraConfig.lora_alpha must be a number > 0, got 0"),
    (dict(lora_alpha=-1.5), r"lora_alpha"),
    (dict(lora_dropout=1.0), r"lora_dropout must be a float in \[0, 1\)"),
    (dict(bias="all"), r"bias='all' is not supported"),
    (dict(init_lora_weights="pissa_x"), r"init_lora_weights must be True, False, 'gaussian', 'pissa'"),
    (dict(target_modules=None), r"target_modules is None"),
    (dict(rank_pattern={"q": 0}), r"rank_pattern\['q'\] must be an integer > 0"),
])
def test_bad_config_is_refused_naming_the_field(kwargs, match):
    kw = dict(target_modules=["q"])
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kw)


def test_rank_above_min_dims_is_allowed_as_in_peft():
    net = Net(d=5, h=6, k=4)
    pm = get_peft_model(net, LoraConfig(r=5, target_modules=["q", "o"]))
    assert {tuple(m.params["lora_A.weight"].shape) for _, m in pm.adapter_layers()} == {(5, 5), (5, 6)}


def test_missing_target_module_lists_the_existing_names():
    net = Net()
    with pytest.raises(ValueError, match=r"\['nope'\] match no linear layer; the linear layers are named \['o', 'q'\]"):
        get_peft_model(net, LoraConfig(target_modules=["q", "nope"], r=2))
    assert type(net.q) is Linear


def test_regex_target_modules():
    pm = get_peft_model(Net(), LoraConfig(target_modules=r".*o", r=2))
    assert isinstance(pm.model.o, LoraLinear) and type(pm.model.q) is Linear


def test_lora_over_a_4bit_base_equals_lora_over_its_dequantised_weight():
    rng = np.random.default_rng(0)
    q = Linear4bit.from_linear(Linear(rng.standard_normal((16, 32)).astype(np.float32),
                                            rng.standard_normal(16).astype(np.float32)))
    q.freeze()
    dense = Linear(np.array(q.effective_weight()), np.array(q.params["bias"]))
    dense.freeze()
    lq, ld = (LoraLinear(b, r=4, rng=np.random.default_rng(1), init_lora_weights=False) for b in (q, dense))
    x, G = rng.standard_normal((5, 32)).astype(np.float32), rng.standard_normal((5, 16)).astype(np.float32)
    assert_close(lq.forward(x), ld.forward(x), "y", 1e-6)
    assert_close(lq.backward(G), ld.backward(G), "dx", 1e-6)
    assert_close(lq.grads[B_KEY], ld.grads[B_KEY], "dB", 1e-6)
    with pytest.raises(TypeError, match="cannot merge into a Linear4bit base"):
        lq.merge()
