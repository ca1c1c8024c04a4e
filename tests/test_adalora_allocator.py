"""AdaLoRA's rank allocator: the budget is conserved exactly, the schedule, the frozen pattern, resume.

A simulated loop drives the controller: every step draws gradients (continuous, tied, or all
zero; optionally identical across layers, so scores tie between layers), takes an SGD step and
calls after_optimizer_step(step), in PEFT's order.
"""
import copy
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spectral_peft.adapters.adalora import (
    AdaLoraConfig,
    AdaLoraController,
    AdaLoraLinear,
    budget_schedule,
)
from spectral_peft.backend import to_host
from spectral_peft.io.checkpoint import decode_state, encode_state
from spectral_peft.module import Linear
from tests._nets import Bag



def cubic_budget(t, b0, bT, tinit, tfinal, T):
    """b(t) written from ALGORITHMS.md (independently of the engine's function)."""
    if t <= tinit:
        return b0
    if t > T - tfinal:
        return bT
    frac = (t - tinit) / (T - tfinal - tinit)
    return int((b0 - bT) * (1 - frac) ** 3 + bT)


def build(config, dims, seed, identical):
    rng = np.random.default_rng(seed)
    layers = []
    for d_in, d_out in dims:
        base = Linear(rng.standard_normal((d_out, d_in)))
        layers.append(AdaLoraLinear(base, r=config.init_r, lora_alpha=config.lora_alpha, ranknum=config.init_r, rng=rng))
    model = Bag(layers)
    model.freeze_all()
    for m in layers:
        m.unfreeze()
        if identical:
            for k in m.params:
                m.params[k][...] = layers[0].params[k]
    return model, layers


def draw_grads(layers, rng, mode, identical):
    for i, m in enumerate(layers):
        for k, p in m.params.items():
            if identical and i > 0:
                g = layers[0].grads[k].copy()
            elif mode == "continuous":
                g = rng.standard_normal(p.shape)
            elif mode == "ties":
                g = rng.integers(-1, 2, size=p.shape).astype(np.float64)
            else:
                g = np.zeros(p.shape)
            m.grads[k] = g


def sgd_step(layers, lr=0.1):
    for m in layers:
        for k, p in m.params.items():
            p -= lr * m.grads[k]


schedules = st.builds(
    lambda init_r, dr, tinit, span, tfinal, deltaT, beta1, beta2: dict(
        init_r=init_r, target_r=init_r - dr, tinit=tinit, total_step=tinit + span + tfinal, tfinal=tfinal,
        deltaT=deltaT, beta1=beta1, beta2=beta2),
    init_r=st.integers(1, 5), dr=st.integers(0, 4), tinit=st.integers(0, 3), span=st.integers(1, 8),
    tfinal=st.integers(0, 3), deltaT=st.integers(1, 3),
    # distinct EMA factors (the defaults are equal, 0.85): the allocation must hold for any pair
    beta1=st.floats(0.05, 0.99), beta2=st.floats(0.05, 0.99),
).filter(lambda d: d["target_r"] >= 0 and d["beta1"] != d["beta2"])


@given(sched=schedules, n=st.integers(1, 4), mode=st.sampled_from(["continuous", "ties", "zeros"]),
       identical=st.booleans(), seed=st.integers(0, 2**16))
def test_budget_is_conserved_exactly_and_the_final_pattern_is_frozen(sched, n, mode, identical, seed):
    config = AdaLoraConfig(target_modules=["l0"], orth_reg_weight=0.0, **sched)
    dims = [(3, 2)] * n if identical else [(2 + i % 3, 3 + i % 2) for i in range(n)]
    model, layers = build(config, dims, seed, identical)
    ctl = AdaLoraController(model, config)
    rng = np.random.default_rng(seed)
    T, tfinal = config.total_step, config.tfinal
    b0, bT = config.init_r * n, config.target_r * n
    x = rng.standard_normal((2, 4))
    frozen = None
    for step in range(T + 3):
        draw_grads(layers, rng, mode, identical)
        sgd_step(layers)
        n_hist = len(ctl.history)
        ctl.after_optimizer_step(step)
        budget = cubic_budget(step, b0, bT, config.tinit, tfinal, T)
        masked_now = len(ctl.history) > n_hist
        expect_mask = (step >= T - tfinal) or (step > config.tinit and step % config.deltaT == 0)
        assert masked_now == expect_mask, f"step {step}: masked={masked_now}, expected {expect_mask}"
        if not masked_now:
            continue
        hist_step, hist_budget, kept = ctl.history[-1]
        assert hist_step == step and hist_budget == budget
        # exactly b(t) triplets survive, whatever the ties
        pattern = np.concatenate([np.array(m.pattern) for m in layers])
        assert kept == budget == int(pattern.sum()), f"step {step}: kept {pattern.sum()} of budget {budget}"
        # masked triplets carry E = 0 and contribute nothing to the output
        for m in layers:
            E = to_host(m.params["lora_E"]).reshape(-1)
            assert np.all(E[~np.array(m.pattern)] == 0)
            A, B = to_host(m.params["lora_A"]), to_host(m.params["lora_B"])
            keep = np.array(m.pattern)
            xi = x[:, :m.d_in]
            ref = xi @ to_host(m.base_layer.params["weight"]).T \
                + (xi @ (A[keep] * E[keep, None]).T @ B[:, keep].T) * m.scale
            assert np.allclose(to_host(m.forward(xi)), ref, rtol=1e-12, atol=1e-14)
        if step >= T - tfinal:
            assert budget == bT
            if frozen is None:
                frozen = pattern.copy()
            assert np.array_equal(pattern, frozen), f"step {step}: the frozen pattern changed"


@given(sched=schedules, n=st.integers(1, 50))
def test_schedule_is_monotone_with_exact_endpoints(sched, n):
    c = AdaLoraConfig(target_modules=["q"], **sched)
    b0, bT = c.init_r * n, c.target_r * n
    budgets = [budget_schedule(t, b0, bT, c.tinit, c.tfinal, c.total_step, c.deltaT)[0]
               for t in range(c.total_step + 3)]
    assert budgets[0] == b0
    assert budgets[c.total_step - c.tfinal] == bT and budgets[-1] == bT
    assert all(a >= b for a, b in zip(budgets, budgets[1:])), budgets
    assert all(bT <= b <= b0 for b in budgets)
    assert budgets == [cubic_budget(t, b0, bT, c.tinit, c.tfinal, c.total_step) for t in range(c.total_step + 3)]


def test_tie_break_keeps_the_smaller_flat_index():
    """All scores tied (zero gradients): exactly b survive, the first b in model order."""
    config = AdaLoraConfig(target_modules=["l0"], init_r=3, target_r=1, total_step=4, orth_reg_weight=0.0)
    model, layers = build(config, [(2, 2), (2, 2)], seed=0, identical=False)
    ctl = AdaLoraController(model, config)
    for m in layers:
        m.zero_grad()
    ctl.after_optimizer_step(2)  # b(2) = int(4 · (1/2)³ + 2) = 2
    assert ctl.history[-1][1] == 2
    assert [m.pattern for m in layers] == [[True, True, False], [False, False, False]]


def test_peft_tie_option_prunes_every_tie():
    """PEFT's rule: every score <= the threshold is pruned, so tied scores leave fewer than b."""
    config = AdaLoraConfig(target_modules=["l0"], init_r=3, target_r=1, total_step=4, orth_reg_weight=0.0,
                           tie_break="peft")
    model, layers = build(config, [(2, 2), (2, 2)], seed=0, identical=False)
    ctl = AdaLoraController(model, config)
    for m in layers:
        m.zero_grad()
    ctl.after_optimizer_step(2)
    assert ctl.history[-1][1:] == (2, 0)  # budget 2, all six tied at 0: all pruned


def test_kept_set_is_the_top_b_by_score_with_index_tie_break():
    config = AdaLoraConfig(target_modules=["l0"], init_r=4, target_r=2, total_step=10, orth_reg_weight=0.0)
    model, layers = build(config, [(3, 2), (2, 3), (4, 4)], seed=5, identical=False)
    ctl = AdaLoraController(model, config)
    rng = np.random.default_rng(1)
    for step in range(6):
        draw_grads(layers, rng, "ties", False)
        sgd_step(layers)
        ctl.allocator.update_ipt()
    scores = np.concatenate([to_host(s) for s in ctl.allocator.triplet_scores()])
    budget = 7
    ctl.allocator.mask_to_budget(budget)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))  # Python's sort, not the engine's
    expected = np.zeros(len(scores), dtype=bool)
    expected[order[:budget]] = True
    got = np.concatenate([np.array(m.pattern) for m in layers])
    assert np.array_equal(got, expected)


def test_resume_from_state_dict_is_exact():
    config = AdaLoraConfig(target_modules=["l0"], init_r=4, target_r=2, tinit=1, tfinal=2, total_step=12,
                           deltaT=2, orth_reg_weight=0.0)
    model, layers = build(config, [(3, 2), (2, 3), (4, 4)], seed=7, identical=False)
    ctl = AdaLoraController(model, config)
    grads_rng = np.random.default_rng(3)
    grads = []
    for step in range(config.total_step + 2):
        draw_grads(layers, grads_rng, "continuous", False)
        grads.append({(i, k): g.copy() for i, m in enumerate(layers) for k, g in m.grads.items()})

    def run(ctl, layers, steps):
        for step in steps:
            for i, m in enumerate(layers):
                for k in m.params:
                    m.grads[k] = grads[step][(i, k)].copy()
            sgd_step(layers)
            ctl.after_optimizer_step(step)

    run(ctl, layers, range(0, 6))
    # through the checkpoint encoding (JSON + arrays), as the Trainer's checkpoints store it
    arrays = {}
    encoded = json.loads(json.dumps(encode_state(ctl.state_dict(), "controller.0", arrays)))
    saved_state = decode_state(encoded, arrays, "<memory>")
    saved_model = copy.deepcopy(model)
    run(ctl, layers, range(6, config.total_step + 2))

    model2 = saved_model
    for _, m in model2.named_modules():  # a fresh controller, its state loaded
        if isinstance(m, AdaLoraLinear):
            m.pattern = None
    ctl2 = AdaLoraController(model2, AdaLoraConfig(**{**config.__dict__}))
    ctl2.load_state_dict(saved_state)
    layers2 = [m for _, m in ctl2.layers]
    run(ctl2, layers2, range(6, config.total_step + 2))
    assert ctl2.history == ctl.history
    for m, m2 in zip(layers, layers2):
        assert m.pattern == m2.pattern
        for k in m.params:
            assert np.array_equal(m.params[k], m2.params[k]), k
    assert ctl2.allocator.frozen_pattern == ctl.allocator.frozen_pattern


def test_load_state_dict_rejects_another_model():
    config = AdaLoraConfig(target_modules=["l0"], init_r=2, target_r=1, total_step=5)
    model, _ = build(config, [(3, 2)], seed=0, identical=False)
    other, _ = build(config, [(3, 2), (2, 2)], seed=0, identical=False)
    with pytest.raises(ValueError, match="init_bgt"):
        AdaLoraController(other, config).load_state_dict(AdaLoraController(model, config).state_dict())


def test_allocation_is_the_same_on_every_backend(backend64):
    """The controller on the fixture's backend picks the same triplets as on the host."""
    config = AdaLoraConfig(target_modules=["l0"], init_r=4, target_r=2, tinit=0, tfinal=2, total_step=8,
                           orth_reg_weight=0.1)
    runs = []
    for be in (None, backend64):
        model, layers = build(config, [(3, 2), (2, 3), (4, 4)], seed=4, identical=False)
        if be is not None:
            for m in layers:
                for k in m.params:
                    m.params[k] = be.asarray(m.params[k])
                m.base_layer.params["weight"] = be.asarray(m.base_layer.params["weight"])
        ctl = AdaLoraController(model, config)
        rng = np.random.default_rng(9)
        for step in range(config.total_step + 1):
            draw_grads(layers, rng, "ties", False)  # host gradients, moved to the backend
            if be is not None:
                for m in layers:
                    m.grads = {k: be.asarray(g) for k, g in m.grads.items()}
            ctl.regularize()
            for m in layers:
                for k in m.params:
                    m.params[k] -= 0.1 * m.grads[k]
            ctl.after_optimizer_step(step)
        runs.append((ctl.history, [m.pattern for m in layers],
                     [to_host(m.params["lora_E"]) for m in layers]))
    (h0, p0, E0), (h1, p1, E1) = runs
    assert h0 == h1 and p0 == p1
    for i, (a, b) in enumerate(zip(E0, E1)):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-15, err_msg=f"lora_E of l{i}")
