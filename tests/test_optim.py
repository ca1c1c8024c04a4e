"""Optimisers, clipping and schedules against PyTorch / transformers over several steps, exact
resume from state_dict, and argument errors."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_peft.module import Linear, Module
from spectral_peft.optim import (SGD, AdamW, LinearWarmupCosineDecay, LinearWarmupLinearDecay,
                                 clip_grad_norm)
from spectral_peft.testing import assert_close

torch = pytest.importorskip("torch", reason="torch: the autograd peer these comparisons run against")


class Two(Module):
    def __init__(self, rng):
        super().__init__()
        self.a = Linear(rng.standard_normal((3, 4)), rng.standard_normal(3))
        self.b = Linear(rng.standard_normal((2, 3)))


def grads_for(step, shapes, seed):
    rng = np.random.default_rng(seed * 1000 + step)
    return [rng.standard_normal(s) for s in shapes]


def run_pair(make_ours, make_torch, steps, seed, freeze_b_bias=False, clip=None):
    rng = np.random.default_rng(seed)
    model = Two(rng)
    names = [n for n, _, _ in model.named_parameters(trainable_only=True)]
    tparams = [torch.tensor(model.state_dict()[n].copy(), requires_grad=True) for n in names]
    opt, topt = make_ours(model), make_torch(tparams)
    shapes = [p.shape for p in tparams]
    for s in range(steps):
        gs = grads_for(s, shapes, seed)
        for (n, m, k), g, tp in zip(model.named_parameters(trainable_only=True), gs, tparams):
            m.grads[k] = g.copy()
            tp.grad = torch.tensor(g.copy())
        if clip is not None:
            n_ours = clip_grad_norm(model, clip)
            n_torch = torch.nn.utils.clip_grad_norm_(tparams, clip).item()
            assert_close(np.array(n_ours), np.array(n_torch), "grad norm", 1e-12)
        opt.step()
        topt.step()
    for n, tp in zip(names, tparams):
        assert_close(model.state_dict()[n], tp.detach().numpy(), n, 1e-12)
    return model, opt


@settings(max_examples=8)
@given(lr=st.floats(1e-4, 0.5), wd=st.sampled_from([0.0, 0.01, 0.3]), b1=st.floats(0.0, 0.95),
       b2=st.floats(0.5, 0.9999), seed=st.integers(0, 1000))
def test_adamw_matches_torch(lr, wd, b1, b2, seed):
    run_pair(lambda m: AdamW(m, lr=lr, betas=(b1, b2), eps=1e-8, weight_decay=wd),
             lambda p: torch.optim.AdamW(p, lr=lr, betas=(b1, b2), eps=1e-8, weight_decay=wd), 6, seed)


@settings(max_examples=8)
@given(lr=st.floats(1e-3, 0.5), mom=st.sampled_from([0.0, 0.5, 0.9]), wd=st.sampled_from([0.0, 0.05]),
       seed=st.integers(0, 1000))
def test_sgd_matches_torch(lr, mom, wd, seed):
    run_pair(lambda m: SGD(m, lr=lr, momentum=mom, weight_decay=wd),
             lambda p: torch.optim.SGD(p, lr=lr, momentum=mom, weight_decay=wd), 5, seed)


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clipping_matches_torch(max_norm):
    run_pair(lambda m: AdamW(m, lr=0.01), lambda p: torch.optim.AdamW(p, lr=0.01), 3, 4, clip=max_norm)


def test_frozen_parameters_untouched_and_params_list():
    rng = np.random.default_rng(0)
    model = Two(rng)
    model.a.freeze("weight")
    before = model.a.params["weight"].copy()
    opt = AdamW(model, lr=0.1)
    assert [n for n, _, _ in opt.params] == ["a.bias", "b.weight"]
    model.zero_grad()
    for _, m, k in model.named_parameters(trainable_only=True):
        m.grads[k] += 1.0
    opt.step()
    assert np.array_equal(model.a.params["weight"], before)
    # a (name, module, key) list selects exactly those parameters
    sgd = SGD([("b.weight", model.b, "weight")], lr=1.0)
    w = model.b.params["weight"].copy()
    b = model.a.params["bias"].copy()
    sgd.step()
    assert_close(model.b.params["weight"], w - 1.0, "b.weight", 1e-15)
    assert np.array_equal(model.a.params["bias"], b)


@pytest.mark.parametrize("cls, hf_name", [(LinearWarmupLinearDecay, "get_linear_schedule_with_warmup"),
                                          (LinearWarmupCosineDecay, "get_cosine_schedule_with_warmup")])
@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 12), (5, 5)])
def test_schedules_match_transformers(cls, hf_name, warmup, total):
    transformers = pytest.importorskip("transformers", reason="transformers: the Hugging Face model peer these comparisons run against")
    p = torch.nn.Parameter(torch.zeros(1))
    topt = torch.optim.SGD([p], lr=0.3)
    tsched = getattr(transformers, hf_name)(topt, warmup, total)
    opt = SGD(Two(np.random.default_rng(0)), lr=0.3)
    sched = cls(opt, warmup, total)
    for _ in range(total + 3):
        assert math.isclose(sched.lr, topt.param_groups[0]["lr"], rel_tol=1e-13, abs_tol=1e-16)
        topt.step()
        tsched.step()
        sched.step()


@pytest.mark.parametrize("make", [lambda m: AdamW(m, lr=0.05, weight_decay=0.1),
                                  lambda m: SGD(m, lr=0.05, momentum=0.9, weight_decay=0.01)])
def test_state_dict_resume_is_exact(make):
    def train(model, opt, sched, steps, start):
        for s in range(start, start + steps):
            gs = grads_for(s, [m.params[k].shape for _, m, k in model.named_parameters()], 7)
            for (_, m, k), g in zip(model.named_parameters(), gs):
                m.grads[k] = g
            opt.step()
            sched.step()

    m1 = Two(np.random.default_rng(1))
    o1 = make(m1)
    s1 = LinearWarmupCosineDecay(o1, 2, 8)
    train(m1, o1, s1, 6, 0)
    m2 = Two(np.random.default_rng(1))
    o2 = make(m2)
    s2 = LinearWarmupCosineDecay(o2, 2, 8)
    train(m2, o2, s2, 3, 0)
    state, sstate = o2.state_dict(), s2.state_dict()
    params = {n: a.copy() for n, a in m2.state_dict().items()}
    m3 = Two(np.random.default_rng(99))
    for n, m, k in m3.named_parameters():
        m.params[k][...] = params[n]
    o3 = make(m3)
    s3 = LinearWarmupCosineDecay(o3, 2, 8)
    o3.load_state_dict(state)
    s3.load_state_dict(sstate)
    train(m3, o3, s3, 3, 3)
    for n, a in m1.state_dict().items():
        assert np.array_equal(a, m3.state_dict()[n]), n
    assert o3.lr == o1.lr


def test_load_state_dict_validates_before_changing():
    m = Two(np.random.default_rng(0))
    opt = AdamW(m)
    bad = {"lr": 0.1, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.0, "step": 3,
           "state.a.weight.exp_avg": np.zeros((4, 3))}
    with pytest.raises(ValueError, match=r"state\.a\.weight\.exp_avg.*shape"):
        opt.load_state_dict(bad)
    assert opt.lr == 1e-3 and opt.step_count == 0
    with pytest.raises(ValueError, match="no parameter"):
        opt.load_state_dict({**bad, "state.a.weight.exp_avg": np.zeros((3, 4)), "state.zz.exp_avg": np.zeros(1)})


@pytest.mark.parametrize("call, match", [
    (lambda m: AdamW(m, lr=-1), "lr"),
    (lambda m: AdamW(m, betas=(0.9, 1.0)), "betas"),
    (lambda m: SGD(m, lr=0.1, momentum=-0.1), "momentum"),
    (lambda m: clip_grad_norm(m, 0), "max_norm"),
    (lambda m: LinearWarmupLinearDecay(SGD(m, lr=1.0), 5, 3), "num_training_steps"),
    (lambda m: SGD([("x", m, "weight")], lr=0.1), "triples"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(Two(np.random.default_rng(0)))
