"""AdaLoRA's rank allocator against PEFT's RankAllocator, replayed from the trace PEFT wrote
(tests/golden/peft_adalora.safetensors, by tests/golden/make_golden.py, peft 0.21.2, float64,
beta1 0.7 != beta2 0.9): same parameters and gradients at every step, and at every step the
budget, the EMAs Ī and Ū and the triplet scores (rtol 1e-12), lora_E after masking (rtol 1e-12, zeros
in the same places) and the rank pattern agree. No peer is needed: the live comparison over more
schedules is test_adalora_peft_parity.py."""
import json
import os

import numpy as np
import pytest
from safetensors import safe_open

from spectral_peft.adapters.adalora import AdaLoraConfig, AdaLoraController, AdaLoraLinear
from spectral_peft.module import Linear
from spectral_peft.testing import assert_close
from tests._nets import Bag

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "peft_adalora.safetensors")
KEYS = ("lora_A", "lora_E", "lora_B")


@pytest.fixture(scope="module")
def trace():
    with safe_open(GOLDEN, "np") as f:
        meta = f.metadata()
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    return arrays, meta


def replay(arrays, meta):
    """Yield (step, controller, layers, masked) after each allocation step, PEFT's inputs replayed."""
    sched = json.loads(meta["schedule"])
    dims = json.loads(meta["dims"])
    lr = float(meta["lr"])
    names = [f"l{i}" for i in range(len(dims))]
    cfg = AdaLoraConfig(target_modules=names, orth_reg_weight=0.0, **sched)
    rng = np.random.default_rng(0)
    layers = [AdaLoraLinear(Linear(arrays[f"{n}.weight"].copy()), r=cfg.init_r, lora_alpha=cfg.lora_alpha,
                            ranknum=cfg.init_r, rng=rng) for n in names]
    for n, m in zip(names, layers):
        for k in KEYS:
            m.params[k][...] = arrays[f"init.{n}.{k}"]
    ctl = AdaLoraController(Bag(layers), cfg)
    for step in range(int(meta["steps"])):
        for n, m in zip(names, layers):
            for k in KEYS:
                g = arrays[f"step{step}.grad.{n}.{k}"]
                m.params[k] -= lr * g  # the update PEFT's parameters followed (make_golden.py)
                m.grads[k] = g.copy()
        n_hist = len(ctl.history)
        ctl.after_optimizer_step(step)
        yield step, ctl, layers, len(ctl.history) > n_hist


def test_trace_is_peft_with_distinct_betas(trace):
    _, meta = trace
    sched = json.loads(meta["schedule"])
    assert meta["peft"] == "0.21.2"
    assert sched["beta1"] != sched["beta2"]


def test_allocator_replays_peft_step_by_step(trace):
    arrays, meta = trace
    sched = json.loads(meta["schedule"])
    patterns = json.loads(meta["rank_patterns"])
    T, tfinal = sched["total_step"], sched["tfinal"]
    masked_steps = []
    for step, ctl, layers, masked in replay(arrays, meta):
        assert ctl.allocator.budget_schedule(step)[0] == arrays["budgets"][step], f"step {step}: budget"
        if step < T - tfinal:
            scores = ctl.allocator.triplet_scores()
            for i in range(len(layers)):
                for k in KEYS:
                    assert_close(ctl.allocator.exp_avg_ipt[(f"l{i}", k)], arrays[f"step{step}.ipt.l{i}.{k}"],
                                 f"step {step} Ī l{i}.{k}", rtol=1e-12)
                    assert_close(ctl.allocator.exp_avg_unc[(f"l{i}", k)], arrays[f"step{step}.unc.l{i}.{k}"],
                                 f"step {step} Ū l{i}.{k}", rtol=1e-12)
                assert_close(scores[i], arrays[f"step{step}.scores.l{i}"], f"step {step} scores l{i}", rtol=1e-12)
        for i, m in enumerate(layers):
            E = arrays[f"step{step}.E.l{i}"]
            assert np.array_equal(m.params["lora_E"] == 0, E == 0), f"step {step}: mask of l{i}"
            assert_close(m.params["lora_E"], E, f"step {step} lora_E l{i}", rtol=1e-12)
        if masked:
            masked_steps.append(step)
        if str(step) in patterns:  # PEFT's config holds the pattern of its latest mask
            assert {f"l{i}.lora_E": m.pattern for i, m in enumerate(layers)} == patterns[str(step)], f"step {step}"
    # masks at t % deltaT == 0 after tinit, then every step of the final phase (ALGORITHMS.md)
    assert masked_steps == [t for t in range(int(meta["steps"]))
                            if t >= T - tfinal or (t > sched["tinit"] and t % sched["deltaT"] == 0)]
    assert masked_steps[0] == min(map(int, patterns))  # PEFT's first pattern appears at the first mask
    final = patterns[max(patterns, key=int)]
    assert ctl.rank_pattern() == final
    assert sum(map(sum, final.values())) == sched["target_r"] * 3
