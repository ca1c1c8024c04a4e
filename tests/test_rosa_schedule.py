"""RoSA schedules, the controller (collection, support choice, exact resume, two-pass recipe),
PeftModel naming and the equal-budget helper."""
import copy

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spectral_peft.adapters.peft_model import config_class, get_peft_model
from spectral_peft.adapters.rosa import (LLAMA2_7B_SHAPES, VALUES_KEY, RosaConfig, RosaLinear, agenda_at,
                                         build_schedule, equal_budget_pairs, load_masks, rosa_parameter_count,
                                         two_pass_configs)
from spectral_peft.module import Linear, Module


class TinyNet(Module):
    """y = fc2(fc1(x)): two linears, enough to carry adapters and a loss."""

    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.fc1 = Linear(rng.standard_normal((8, 6)) * 0.5, rng.standard_normal(8) * 0.1)
        self.fc2 = Linear(rng.standard_normal((5, 8)) * 0.5)

    def forward(self, x):
        return self.fc2.forward(self.fc1.forward(x))

    def backward(self, dy):
        return self.fc1.backward(self.fc2.backward(dy))


def data(step):
    rng = np.random.default_rng(1000 + step)
    return rng.standard_normal((4, 6)), rng.standard_normal((4, 5))


def train(peft, steps, lr=0.01):
    ctrl = peft.controllers[0]
    for step in steps:
        x, t = data(step)
        ctrl.before_forward(step)
        y = peft.forward(x)
        peft.zero_grad()
        assert np.all(np.isfinite(y)), f"step {step}: the toy run diverged"
        peft.backward(y - t)  # loss = ½‖y − t‖²
        ctrl.after_backward(step)
        for _, m, k in peft.named_parameters(trainable_only=True):
            m.params[k] -= lr * m.grads[k]
        ctrl.after_optimizer_step(step)
        if ctrl.should_stop:
            return step
    return None


def config(**kw):
    base = dict(target_modules=["fc1", "fc2"], r=2, d=0.25, lora_alpha=4, schedule="wl2", spa_num_grads=3)
    base.update(kw)
    return RosaConfig(**base)


def test_schedule_agendas_follow_peft_rosa():
    s = build_schedule("wl64", spa_num_grads=2, d=0.01)
    assert [agenda_at(s, t) for t in (0, 63, 64, 65, 66, 10_000)] == [
        {"lora"}, {"lora"}, {"lora", "grad_collection"}, {"lora", "grad_collection"}, {"lora", "spa"},
        {"lora", "spa"}]
    assert agenda_at(build_schedule("wl64", 2, 0.01, collect=False), 64) == {"lora", "spa"}
    assert agenda_at(build_schedule("default", 1, 0.01), 0) == {"lora", "grad_collection"}
    s = build_schedule("spa_only", 2, 0.01)
    assert [agenda_at(s, t) for t in (0, 1, 2)] == [{"grad_collection"}, {"grad_collection"}, {"spa"}]
    assert agenda_at(build_schedule("lora_only", 1, 0.0), 5) == {"lora"}
    with pytest.raises(ValueError, match="'lora_only' needs d = 0"):
        build_schedule("lora_only", 1, 0.1)
    with pytest.raises(ValueError, match="'spa_only' needs d > 0"):
        build_schedule("spa_only", 1, 0.0)


def test_wl_schedule_collects_then_trains_both():
    peft = get_peft_model(TinyNet(), config(), seed=0)
    names = sorted(n for n, _, _ in peft.named_parameters(trainable_only=True))
    assert names == ["base_model.model.fc1.rosa_A.weight", "base_model.model.fc1.rosa_B.weight",
                     "base_model.model.fc1.rosa_spa.values",
                     "base_model.model.fc2.rosa_A.weight", "base_model.model.fc2.rosa_B.weight",
                     "base_model.model.fc2.rosa_spa.values"]
    layers = [m for _, m in peft.adapter_layers()]
    assert all(isinstance(m, RosaLinear) for m in layers)
    train(peft, range(2))  # warm-up: LoRA only, nothing collected, the values untouched
    assert all(m.spa is None and m.grad_count == 0 for m in layers)
    assert all(np.all(m.params[VALUES_KEY] == 0) and np.all(m.grads[VALUES_KEY] == 0) for m in layers)
    train(peft, range(2, 4))  # two of the three collection steps
    assert all(m.spa is None and m.grad_count == 2 for m in layers)
    train(peft, range(4, 5))  # the last collection step chooses the supports
    for m in layers:
        assert m.spa is not None and m.grad_sum is None
        assert m.spa.nnz == int(0.25 * m.d_out * m.d_in)
        assert np.all(m.params[VALUES_KEY] == 0)
    assert peft.num_parameters(trainable_only=True) == sum(
        2 * (m.d_in + m.d_out) + int(0.25 * m.d_out * m.d_in) for m in layers)
    train(peft, range(5, 6))
    assert all(np.any(m.params[VALUES_KEY] != 0) for m in layers)


def test_resume_mid_collection_is_exact():
    straight = get_peft_model(TinyNet(), config(), seed=0)
    train(straight, range(8))
    first = get_peft_model(TinyNet(), config(), seed=0)
    train(first, range(3))  # stop one step into the collection
    params = {n: m.params[k].copy() for n, m, k in first.named_parameters()}
    state = copy.deepcopy(first.controllers[0].state_dict())
    resumed = get_peft_model(TinyNet(), config(), seed=1)  # other init: everything must come from the state
    for n, m, k in resumed.named_parameters():
        m.params[k][...] = params[n]
    resumed.controllers[0].load_state_dict(state)
    train(resumed, range(3, 8))
    for (n, m, k), (_, m2, k2) in zip(straight.named_parameters(), resumed.named_parameters()):
        np.testing.assert_array_equal(m.params[k], m2.params[k2], err_msg=n)
    for (_, a), (_, b) in zip(straight.adapter_layers(), resumed.adapter_layers()):
        np.testing.assert_array_equal(a.support_mask(), b.support_mask())


def test_resume_after_activation_keeps_values_and_supports():
    first = get_peft_model(TinyNet(), config(), seed=0)
    train(first, range(6))
    state = copy.deepcopy(first.controllers[0].state_dict())
    params = {n: m.params[k].copy() for n, m, k in first.named_parameters()}
    resumed = get_peft_model(TinyNet(), config(), seed=0)
    for n, m, k in resumed.named_parameters():
        m.params[k][...] = params[n]
    resumed.controllers[0].load_state_dict(state)
    train(first, range(6, 8))
    train(resumed, range(6, 8))
    for (n, m, k), (_, m2, k2) in zip(first.named_parameters(), resumed.named_parameters()):
        np.testing.assert_array_equal(m.params[k], m2.params[k2], err_msg=n)


def test_two_pass_recipe(tmp_path):
    pass1, pass2 = two_pass_configs(config(), str(tmp_path / "masks"), warmup=2)
    peft = get_peft_model(TinyNet(), pass1, seed=0)
    stopped_at = train(peft, range(100))
    assert stopped_at == 4  # warm-up 2 steps + 3 collection steps, stops after the last one
    saved = load_masks(str(tmp_path / "masks"))
    assert sorted(saved) == ["base_model.model.fc1", "base_model.model.fc2"]
    # pass 2: supports loaded at construction, both adapters trained from step 0
    peft2 = get_peft_model(TinyNet(), pass2, seed=0)
    for path, m in peft2.adapter_layers():
        np.testing.assert_array_equal(m.support_mask(), saved[path].mask())
    train(peft2, range(1))
    assert all(np.any(m.params[VALUES_KEY] != 0) for _, m in peft2.adapter_layers())
    # a mask that does not fit the model: a clear error
    bad = config(target_modules=["fc1"], d=0.5, schedule="wl0", mask_load_path=str(tmp_path / "masks"))
    with pytest.raises(ValueError, match="with 12 entries; the layer needs"):
        get_peft_model(TinyNet(), bad, seed=0)


def test_spa_only_freezes_lora_and_sparse_only_with_r0():
    peft = get_peft_model(TinyNet(), config(r=0, schedule="spa_only", spa_num_grads=1), seed=0)
    assert peft.num_parameters(trainable_only=True) == int(0.25 * 48) + int(0.25 * 40)
    train(peft, range(1))
    layers = [m for _, m in peft.adapter_layers()]
    assert all(m.spa is not None and np.all(m.params[VALUES_KEY] == 0) for m in layers)
    train(peft, range(1, 2))
    assert all(np.any(m.params[VALUES_KEY] != 0) for m in layers)
    with_lora = get_peft_model(TinyNet(), config(r=2, schedule="spa_only", spa_num_grads=1), seed=0)
    assert sorted(n.rsplit(".", 1)[-1] for n, _, _ in with_lora.named_parameters(trainable_only=True)) == [
        "values", "values"]  # LoRA frozen throughout spa_only


def test_density_pattern_alone_gives_a_sparse_adapter():
    peft = get_peft_model(TinyNet(), config(d=0.0, density_pattern={"fc2": 0.5}, schedule="wl0", spa_num_grads=1))
    train(peft, range(1))
    layers = dict(peft.adapter_layers())
    assert layers["base_model.model.fc1"].nnz == 0 and layers["base_model.model.fc1"].spa is None
    assert layers["base_model.model.fc2"].spa.nnz == int(0.5 * 40)


def test_density_pattern_and_json_round_trip():
    cfg = config(density_pattern={"fc2": 0.5}, rank_pattern={"fc1": 3})
    peft = get_peft_model(TinyNet(), cfg, seed=0)
    layers = dict(peft.adapter_layers())
    assert layers["base_model.model.fc1"].nnz == int(0.25 * 48) and layers["base_model.model.fc1"].r == 3
    assert layers["base_model.model.fc2"].nnz == int(0.5 * 40) and layers["base_model.model.fc2"].r == 2
    d = cfg.to_json_dict()
    assert d["peft_type"] == "ROSA" and d["d"] == 0.25 and d["spa_num_grads"] == 3
    d["base_model_name_or_path"] = "somewhere"  # a PEFT-generic key: ignored
    assert config_class("ROSA").from_json_dict(d) == cfg


def test_paper_budget_rows_on_llama2_7b():
    """RoSA paper (LLaMA-2-7B, ≈40M params): LoRA r = 16 ≈ RoSA r = 12, d = 0.15% ≈ r = 4, d = 0.45%."""
    per_block_lora = 4 * (4096 + 4096) + 2 * (11008 + 4096) + (4096 + 11008)  # r = 1, one block
    budget = 16 * 32 * per_block_lora
    assert budget == 39_976_960
    pairs = {p.r: p for p in equal_budget_pairs(budget, LLAMA2_7B_SHAPES, ranks=(16, 12, 4), resolution=5e-4)}
    assert (pairs[16].d, pairs[12].d, pairs[4].d) == (0.0, 0.0015, 0.0045)
    numel_block = 4 * 4096 * 4096 + 3 * 11008 * 4096
    expected_r12 = 12 * 32 * per_block_lora + 32 * (4 * int(0.0015 * 4096 * 4096) + 3 * int(0.0015 * 11008 * 4096))
    assert pairs[12].params == expected_r12 <= budget
    assert 0.97 < pairs[4].params / budget <= 1.0
    assert numel_block * 32 == sum(a * b for a, b in LLAMA2_7B_SHAPES)


@given(budget=st.integers(0, 5000), dims=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1,
                                                  max_size=4))
def test_budget_pairs_fit_and_are_maximal(budget, dims):
    res = 1e-3
    for p in equal_budget_pairs(budget, dims, ranks=(0, 1, 2, 4), resolution=res):
        count = sum(p.r * (a + b) + int(p.d * (a * b)) for a, b in dims)
        assert count == p.params == rosa_parameter_count(dims, p.r, p.d) <= budget
        if p.d + res <= 1.0:
            bigger = round(p.d + res, 12)
            assert sum(p.r * (a + b) + int(bigger * (a * b)) for a, b in dims) > budget or bigger > 1
    # a rank whose LoRA part alone is over budget is left out
    assert all(p.r * sum(a + b for a, b in dims) <= budget for p in equal_budget_pairs(budget, dims))


def test_figures_are_written(tmp_path):
    from spectral_peft.adapters.rosa import density_summary
    from spectral_peft.plots.rosa import plot_density_per_layer, plot_loss_curves, plot_support_pattern

    peft = get_peft_model(TinyNet(), config(schedule="wl0", spa_num_grads=1), seed=0)
    train(peft, range(1))
    summary = density_summary(peft.adapter_layers())
    assert [round(v["density"], 6) for v in summary.values()] == [round(12 / 48, 6), round(10 / 40, 6)]
    plot_density_per_layer(summary, tmp_path / "density.png")
    mask = dict(peft.adapter_layers())["base_model.model.fc1"].support_mask()
    plot_support_pattern(mask, tmp_path / "support.png")
    plot_loss_curves({"LoRA": [3.0, 2.0], "RoSA": {"steps": [0, 1], "loss": [3.0, 1.5], "params": 10}},
                     tmp_path / "loss.png")
    for name in ("density.png", "support.png", "loss.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="must be 2-D"):
        plot_support_pattern(np.ones(3), tmp_path / "bad.png")


def test_adapter_files_round_trip_through_io_peft(tmp_path):
    from spectral_peft.adapters.peft_model import load_peft_model, save_adapter
    from spectral_peft.io.safe import FileFormatError, load_safetensors, save_safetensors

    peft = get_peft_model(TinyNet(), config(schedule="wl0", spa_num_grads=1), seed=0)
    train(peft, range(3))
    save_adapter(peft, tmp_path / "adapter")
    keys = sorted(load_safetensors(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert keys[:6] == ["base_model.model.fc1.rosa_A.weight", "base_model.model.fc1.rosa_B.weight",
                        "base_model.model.fc1.rosa_spa.col_idx", "base_model.model.fc1.rosa_spa.row_idx",
                        "base_model.model.fc1.rosa_spa.row_offs", "base_model.model.fc1.rosa_spa.values"]
    loaded = load_peft_model(TinyNet(), tmp_path / "adapter", seed=3)
    x, _ = data(0)
    np.testing.assert_array_equal(loaded.forward(x), peft.forward(x))
    # the loaded supports are kept: its controller never collects over them
    ctrl = loaded.controllers[0]
    ctrl.before_forward(0)
    assert ctrl.activated and not any(m.collecting for _, m in loaded.adapter_layers())
    # a values array of the wrong size is refused, naming the key; the model is left untouched
    arrays = load_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")
    arrays["base_model.model.fc2.rosa_spa.values"] = np.zeros(3, dtype=np.float64)
    save_safetensors(arrays, tmp_path / "adapter" / "adapter_model.safetensors")
    plain = TinyNet()
    with pytest.raises(FileFormatError, match="rosa_spa.values"):
        load_peft_model(plain, tmp_path / "adapter")
    assert isinstance(plain.fc2, Linear) and not plain.fc2.frozen


def test_adamw_built_at_step_0_trains_the_values_once_chosen():
    from spectral_peft.optim import AdamW

    peft = get_peft_model(TinyNet(), config(schedule="wl1", spa_num_grads=1), seed=0)
    opt = AdamW(peft, lr=1e-2, weight_decay=0.1)
    ctrl = peft.controllers[0]
    layers = [m for _, m in peft.adapter_layers()]
    for step in range(4):
        x, t = data(step)
        ctrl.before_forward(step)
        y = peft.forward(x)
        peft.backward(y - t)
        ctrl.after_backward(step)
        opt.step()
        ctrl.after_optimizer_step(step)
        peft.zero_grad()
        if step < 2:  # warm-up and collection: values exactly zero despite AdamW's weight decay
            assert all(np.all(m.params[VALUES_KEY] == 0) for m in layers)
    assert all(np.count_nonzero(m.params[VALUES_KEY]) == m.nnz for m in layers)


def test_trainer_checkpoint_resume_mid_collection_is_exact(tmp_path):
    """Through the engine's Trainer and checkpoints, GPT-2 with dropout on the low-rank branch:
    stopped one step into the collection and resumed, the run ends bitwise equal."""
    from spectral_peft.backend import get_backend
    from spectral_peft.model import GPT2Config, GPT2LMHeadModel
    from spectral_peft.optim import AdamW
    from spectral_peft.train import Trainer

    be = get_backend("cpu", "float64")
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=20, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    rng = np.random.default_rng(0)
    batches = [{"input_ids": rng.integers(0, 20, (2, 8)), "labels": rng.integers(0, 20, (2, 8))} for _ in range(7)]

    def make():
        peft = get_peft_model(GPT2LMHeadModel(cfg, be, seed=0), RosaConfig(
            r=2, d=0.05, lora_alpha=4, lora_dropout=0.1, target_modules=["c_attn", "c_fc"], schedule="wl2",
            spa_num_grads=2), seed=0)
        return peft, AdamW(peft, lr=1e-2)

    peft, opt = make()
    trainer = Trainer(peft, opt, checkpoint_dir=tmp_path)
    for i in range(3):
        trainer.train_step(batches[i])
    trainer.save_checkpoint()
    for i in range(3, 7):
        trainer.train_step(batches[i])
    peft2, opt2 = make()
    trainer2 = Trainer(peft2, opt2, checkpoint_dir=tmp_path)
    start = trainer2.resume()
    assert start == 3
    for i in range(start, 7):
        trainer2.train_step(batches[i])
    for (n, m, k), (_, m2, k2) in zip(peft.named_parameters(), peft2.named_parameters()):
        np.testing.assert_array_equal(m.params[k], m2.params[k2], err_msg=n)
    assert all(np.count_nonzero(m.params[VALUES_KEY]) > 0 for _, m in peft2.adapter_layers())
