"""Parity with PEFT's RankAllocator (peft 0.21.2), step by step, in float64.

PEFT and spectral_peft are fed the same parameters and gradients for a whole schedule; at every
step the budget, the EMAs Ī and Ū, the triplet scores (<= 1e-12), the masks (E zeroed in the
same places) and the rank_pattern must agree, and so must the final pattern. Tie-free scores are
compared under the engine's default rule; exact ties (identical layers) under tie_break="peft".
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch: the autograd peer these comparisons run against")
peft = pytest.importorskip("peft", reason="peft: the PEFT peer these comparisons run against")
from torch import nn  # noqa: E402

from spectral_peft.adapters.adalora import AdaLoraConfig, AdaLoraController, AdaLoraLinear  # noqa: E402
from spectral_peft.module import Linear  # noqa: E402
from spectral_peft.testing import assert_close  # noqa: E402
from tests._nets import Bag  # noqa: E402

KEYS = ("lora_A", "lora_E", "lora_B")


class TorchNet(nn.Module):
    def __init__(self, dims):
        super().__init__()
        for i, (d_in, d_out) in enumerate(dims):
            setattr(self, f"l{i}", nn.Linear(d_in, d_out, bias=False))



def make_pair(dims, sched, tie_break, seed, identical):
    names = [f"l{i}" for i in range(len(dims))]
    torch.manual_seed(seed)
    net = TorchNet(dims).double()
    pcfg = peft.AdaLoraConfig(target_modules=names, **sched)
    pm = peft.get_peft_model(net, pcfg).double()
    cfg = AdaLoraConfig(target_modules=names, tie_break=tie_break, **sched)
    rng = np.random.default_rng(seed)
    layers = []
    for i, (d_in, d_out) in enumerate(dims):
        W = getattr(net, f"l{i}").base_layer.weight.detach().numpy().copy()
        layers.append(AdaLoraLinear(Linear(W), r=cfg.init_r, lora_alpha=cfg.lora_alpha, ranknum=cfg.init_r, rng=rng))
    model = Bag(layers)
    for m in layers:
        m.params["lora_E"][...] = rng.standard_normal(m.params["lora_E"].shape)  # non-zero singular values
        if identical:
            for k in KEYS:
                m.params[k][...] = layers[0].params[k]
    return pm, pcfg, model, layers, AdaLoraController(model, cfg)


def torch_params(pm, i):
    mod = getattr(pm.base_model.model, f"l{i}")
    return {k: getattr(mod, k)["default"] for k in KEYS}


def peft_scores(alloc, i):
    """PEFT's triplet score of layer i, through PEFT's own element score and combination."""
    n = f"l{i}.%s.default"
    s_A = torch.mean(alloc._element_score(n % "lora_A"), dim=1, keepdim=True)
    s_B = torch.mean(alloc._element_score(n % "lora_B"), dim=0, keepdim=False).view(-1, 1)
    return alloc._combine_ipt(alloc._element_score(n % "lora_E"), torch.cat([s_A, s_B], dim=1)).numpy()


SCHEDULES = [
    dict(init_r=4, target_r=2, tinit=2, tfinal=3, total_step=14, deltaT=2, beta1=0.85, beta2=0.85),
    dict(init_r=3, target_r=1, tinit=0, tfinal=2, total_step=9, deltaT=1, beta1=0.6, beta2=0.9),
    dict(init_r=5, target_r=3, tinit=1, tfinal=0, total_step=8, deltaT=3, beta1=0.85, beta2=0.5),
]


@pytest.mark.parametrize("sched", SCHEDULES)
@pytest.mark.parametrize("tie_break, identical", [("index", False), ("peft", False), ("peft", True)])
def test_allocator_matches_peft_step_by_step(sched, tie_break, identical):
    dims = [(5, 4)] * 3 if identical else [(5, 4), (3, 6), (4, 4)]
    pm, pcfg, model, layers, ctl = make_pair(dims, sched, tie_break, seed=sched["total_step"], identical=identical)
    alloc = pm.base_model.rankallocator
    rng = np.random.default_rng(11)
    T, tfinal = sched["total_step"], sched["tfinal"]
    saw_ties = False
    for step in range(T + 2):
        # an "optimizer step" and fresh gradients, identical for both
        grads = [{k: rng.standard_normal(m.params[k].shape) for k in KEYS} for m in layers]
        if identical:
            grads = [grads[0]] * len(layers)
        for m, g in zip(layers, grads):
            for k in KEYS:
                m.params[k] -= 0.05 * g[k]
                m.grads[k] = g[k].copy()
        with torch.no_grad():
            for i, (m, g) in enumerate(zip(layers, grads)):
                for k, p in torch_params(pm, i).items():
                    p.copy_(torch.from_numpy(m.params[k]))
                    p.grad = torch.from_numpy(g[k].copy())
        pm.base_model.update_and_allocate(step)
        n_hist = len(ctl.history)
        ctl.after_optimizer_step(step)

        assert ctl.allocator.budget_schedule(step) == alloc.budget_schedule(step), f"step {step}: budget"
        if step < T - tfinal:
            for i, m in enumerate(layers):
                for k in KEYS:
                    name = f"l{i}.{k}.default"
                    assert_close(ctl.allocator.exp_avg_ipt[(f"l{i}", k)], alloc.exp_avg_ipt[name].numpy(),
                                 f"step {step} Ī {name}", rtol=1e-12)
                    assert_close(ctl.allocator.exp_avg_unc[(f"l{i}", k)], alloc.exp_avg_unc[name].numpy(),
                                 f"step {step} Ū {name}", rtol=1e-12)
            ours = ctl.allocator.triplet_scores()
            for i in range(len(layers)):
                assert_close(ours[i], peft_scores(alloc, i), f"step {step} scores l{i}", rtol=1e-12)
            flat = np.concatenate(ours)
            saw_ties |= len(np.unique(flat)) < flat.size
        # masks: E zeroed in the same places
        for i, m in enumerate(layers):
            E_peft = torch_params(pm, i)["lora_E"].detach().numpy()
            assert np.array_equal(m.params["lora_E"] == 0, E_peft == 0), f"step {step}: mask of l{i}"
        if len(ctl.history) > n_hist:
            peft_pattern = {k.replace(".default", ""): v for k, v in pcfg.rank_pattern.items()}
            assert {f"l{i}.lora_E": m.pattern for i, m in enumerate(layers)} == peft_pattern, f"step {step}"
    final = {k.replace(".default", ""): v for k, v in pcfg.rank_pattern.items()}
    assert ctl.allocator.frozen_pattern == final or tfinal == 0
    assert ctl.rank_pattern() == final
    if identical:
        assert saw_ties  # the case did exercise exact ties
    else:
        assert not saw_ties
        assert sum(sum(v) for v in final.values()) == sched["target_r"] * len(layers)


def test_index_rule_differs_from_peft_only_by_keeping_ties():
    """With exact ties PEFT keeps fewer than b(t); the engine keeps exactly b(t)."""
    sched = SCHEDULES[1]
    dims = [(5, 4)] * 3
    pm, pcfg, model, layers, ctl = make_pair(dims, sched, "index", seed=3, identical=True)
    rng = np.random.default_rng(0)
    step = 3
    g = {k: rng.standard_normal(layers[0].params[k].shape) for k in KEYS}
    for i, m in enumerate(layers):
        for k in KEYS:
            m.grads[k] = g[k].copy()
        with torch.no_grad():
            for k, p in torch_params(pm, i).items():
                p.copy_(torch.from_numpy(m.params[k]))
                p.grad = torch.from_numpy(g[k].copy())
    pm.base_model.update_and_allocate(step)
    ctl.after_optimizer_step(step)
    budget = ctl.history[-1][1]
    peft_kept = sum(sum(v) for v in pcfg.rank_pattern.values())
    assert budget % 3 != 0  # the budget splits a 3-way tie
    assert ctl.history[-1][2] == budget
    assert peft_kept < budget
