"""The method protocol: the registry, every config's closed parameter count against the model it
builds, the budget matcher that uses it, and the controllers' reports.

Expected counts are the trainable entries of the built model (counted by the Module, not by the
formula under test); budgets are stated in GPT-2's shapes.
"""
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_peft.adapters.dora import DoraConfig
from spectral_peft.adapters.lora import LoraConfig
from spectral_peft.adapters.peft_model import adapted_shapes, get_peft_model
from spectral_peft.adapters.registry import METHODS, RECIPES, config_class, recipe, resolve
from spectral_peft.backend import get_backend
from spectral_peft.budget import BudgetUnreachable, match_budget
from spectral_peft.commands.run_options import RunConfig
from spectral_peft.model import GPT2Config, GPT2LMHeadModel
from spectral_peft.quant import quantize_model

TARGETS = "c_attn,c_proj,c_fc"


def gpt2(n_embd=16, n_layer=2):
    cfg = GPT2Config(vocab_size=32, n_positions=16, n_embd=n_embd, n_layer=n_layer, n_head=2)
    return GPT2LMHeadModel(cfg, get_backend("cpu", "float64"), seed=0)


def options(**kw):
    values = dict(steps=20, r=4, target_modules=TARGETS, spa_num_grads=2, deltaT=1)
    values.update(kw)
    return RunConfig(**values)


def test_registry_maps_peft_types_and_dora():
    assert config_class("lora") is LoraConfig and config_class("LORA", use_dora=True) is DoraConfig
    with pytest.raises(ValueError, match=r"unsupported peft_type 'IA3'; supported: \['ADALORA', 'LORA', .*'ROSA'\]"):
        config_class("IA3")
    with pytest.raises(ValueError, match="use_dora=True goes with peft_type 'LORA'"):
        config_class("ADALORA", use_dora=True)
    plain = LoraConfig(r=2, target_modules=["c_attn"], use_dora=True)
    dora = resolve(plain)
    assert type(dora) is DoraConfig and dora.to_json_dict() == plain.to_json_dict()
    assert resolve(dora) is dora
    with pytest.raises(ValueError, match=r"builds DoRA layers through the registry"):
        plain.make_layer("c_attn", None, None)
    assert METHODS == tuple(RECIPES) and METHODS[0] == "full"
    with pytest.raises(ValueError, match="unknown method 'ia3'; choose from full, lora"):
        recipe("ia3")


def test_get_peft_model_builds_dora_from_a_lora_config():
    peft = get_peft_model(gpt2(), LoraConfig(r=2, target_modules=["c_attn"], use_dora=True))
    layer = dict(peft.adapter_layers())["base_model.model.transformer.h.0.attn.c_attn"]
    assert type(layer).__name__ == "DoraLinear" and "lora_magnitude_vector" in layer.params


# the methods that adapt linears; prefix and prompt tuning adapt none (their counts and budgets:
# tests/test_prefix_tuning.py, tests/test_prompt_tuning.py)
LINEAR_METHODS = [m for m in METHODS if m != "full" and recipe(m).knob != "num_virtual_tokens"]


@pytest.mark.parametrize("name", LINEAR_METHODS)
@settings(max_examples=4, deadline=None)
@given(size_seed=st.integers(0, 3))
def test_parameter_count_is_what_the_model_trains(name, size_seed):
    """config.parameter_count(shapes) == the built PeftModel's trainable count, at several sizes and
    with a rank_pattern, for every recipe (the 4-bit bases included)."""
    rec = recipe(name)
    opts = options()
    if rec.knob == "d":
        size = (0.01, 0.05, 0.2, 0.5)[size_seed]
    elif rec.mixed_ranks:
        size = (1, 3, (2, {"transformer.h.1.mlp.c_fc": 3}), (4, {"transformer.h.0.attn.c_attn": 5}))[size_seed]
    else:
        size = (1, 2, 3, 5)[size_seed]
    base = gpt2()
    shapes = adapted_shapes(base, opts.target_list())
    if rec.quantized:
        quantize_model(base, blocksize=64)
    peft = get_peft_model(base, rec.make_config(opts, size))
    assert peft.peft_config.parameter_count(shapes) == peft.trainable_parameter_count()
    assert shapes == peft.target_shapes()


def test_parameter_count_formulas_in_gpt2_shapes():
    """LoRA r·16C per layer; DoRA adds d_out (3C + C + 4C + C = 9C); LoRA-FA keeps B only (r·9C);
    AdaLoRA r·(d_in + 1 + d_out) per matrix (16C + 4); RoSA adds int(d·numel) per matrix."""
    C, L, r = 16, 2, 3
    shapes = adapted_shapes(gpt2(C, L), TARGETS.split(","))
    opts = options()
    assert recipe("lora").make_config(opts, r).parameter_count(shapes) == L * r * 16 * C
    assert recipe("dora").make_config(opts, r).parameter_count(shapes) == L * (r * 16 * C + 9 * C)
    assert recipe("lorafa").make_config(opts, r).parameter_count(shapes) == L * r * 9 * C
    assert recipe("adalora").make_config(opts, r).parameter_count(shapes) == L * r * (16 * C + 4)
    d, rosa_r = 0.1, opts.r // 2
    nnz = L * sum(int(d * (o * i)) for o, i in ((3 * C, C), (C, C), (4 * C, C), (C, 4 * C)))
    assert recipe("rosa").make_config(opts, d).parameter_count(shapes) == L * rosa_r * 16 * C + nnz


@pytest.mark.parametrize("name", [m for m in LINEAR_METHODS if not recipe(m).own_budget])
def test_match_budget_comes_within_tolerance(name):
    C, L = 16, 2
    shapes = adapted_shapes(gpt2(C, L), TARGETS.split(","))
    budget = 4 * 16 * C * L  # LoRA at r = 4
    size, count = match_budget(recipe(name), options(), shapes, budget, 0.05)
    assert abs(count - budget) <= 0.05 * budget, (name, size, count)
    assert recipe(name).make_config(options(), size).parameter_count(shapes) == count
    if name in ("lora", "rslora", "qlora", "dylora", "deltalora"):
        assert size == 4


def test_match_budget_takes_a_preset_and_refuses_an_unreachable_budget():
    shapes = adapted_shapes(gpt2(), TARGETS.split(","))
    assert match_budget(recipe("adalora"), options(init_r=7), shapes, 10, 0.05)[0] == 7
    assert match_budget(recipe("rosa"), options(d=0.25), shapes, 10, 0.05)[0] == 0.25
    with pytest.raises(BudgetUnreachable, match=r"already has 1,024 trainable parameters, at or over the budget 100"):
        match_budget(recipe("rosa"), options(), shapes, 100, 0.05)


def test_mixed_ranks_raise_the_largest_steps_first():
    """DoRA between two ranks: the pattern gives r + 1 to modules until the count is nearest."""
    shapes = adapted_shapes(gpt2(), TARGETS.split(","))
    opts = options()
    budget = recipe("lora").make_config(opts, 4).parameter_count(shapes)
    size, count = match_budget(recipe("dora"), opts, shapes, budget, 0.0)
    r, pattern = size
    assert r == 3 and pattern and set(pattern.values()) == {4}
    others = [abs(recipe("dora").make_config(opts, k).parameter_count(shapes) - budget) for k in (3, 4)]
    assert abs(count - budget) < min(others)


def test_controllers_report_the_figures_data():
    opts = options(steps=4)
    ev = SimpleNamespace(calls=0)

    def evaluate():
        ev.calls += 1
        return float(ev.calls)

    ada = get_peft_model(gpt2(), recipe("adalora").make_config(opts, 3))
    rep = ada.report(evaluate)
    assert set(rep) >= {"singular_values", "rank_pattern", "final_ranks", "lora_E", "budget_schedule"}
    assert len(rep["budget_schedule"]["budget"]) == opts.steps
    assert all(len(v) == 3 for v in rep["rank_pattern"].values())
    dy = get_peft_model(gpt2(), recipe("dylora").make_config(opts, 3))
    rep = dy.report(evaluate)
    assert rep["rank_eval"] == {"ranks": [1, 2, 3], "losses": [1.0, 2.0, 3.0]}
    rosa = get_peft_model(gpt2(), recipe("rosa").make_config(opts, 0.1))
    rep = rosa.report(evaluate)
    first = rep["density"]["h.0.attn.c_attn"]
    assert first == {"nnz": int(0.1 * 48 * 16), "shape": [48, 16], "density": int(0.1 * 48 * 16) / (48 * 16)}
    assert "support" not in rep  # no support chosen yet
    sv = rep["singular_values"]["h.0.attn.c_attn"]
    assert len(sv) == 16 and np.all(np.diff(sv) <= 0)
