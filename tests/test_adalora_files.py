"""AdaLoRA's PEFT files both ways: resized arrays, rank_pattern, rank-0 modules, and the loss with
the orthogonal regulariser against torch + PEFT (AdaLoraModel.forward adds it to outputs.loss).

The model is a chain of three linears (l0 -> l1 -> l2) in both engines; a squared-error loss
stands in for the task loss.
"""
import json
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch: the autograd peer these comparisons run against")
peft = pytest.importorskip("peft", reason="peft: the PEFT peer these comparisons run against")
from torch import nn  # noqa: E402

from spectral_peft.adapters.adalora import AdaLoraConfig, AdaLoraLinear, orth_regularizer  # noqa: E402
from spectral_peft.adapters.peft_model import get_peft_model  # noqa: E402
from spectral_peft.backend import get_backend, to_host  # noqa: E402
from spectral_peft.adapters.peft_model import load_peft_model, save_adapter  # noqa: E402
from spectral_peft.io.safe import load_safetensors  # noqa: E402
from spectral_peft.model import GPT2Config, GPT2LMHeadModel  # noqa: E402
from spectral_peft.module import Linear, Module  # noqa: E402
from spectral_peft.optim import SGD  # noqa: E402
from spectral_peft.testing import assert_close  # noqa: E402
from spectral_peft.train import Trainer  # noqa: E402

DIMS = [(6, 5), (5, 7), (7, 4)]  # (d_in, d_out) of l0, l1, l2
NAMES = ["l0", "l1", "l2"]

class Chain(Module):
    """x -> l0 -> l1 -> l2, the engine side."""

    def __init__(self, weights):
        super().__init__()
        for name, W in zip(NAMES, weights):
            setattr(self, name, Linear(W))

    def forward(self, x):
        for name in NAMES:
            x = getattr(self, name).forward(x)
        return x

    def backward(self, dy):
        for name in reversed(NAMES):
            dy = getattr(self, name).backward(dy)
        return dy


class TorchChain(nn.Module):
    def __init__(self, weights):
        super().__init__()
        for name, W in zip(NAMES, weights):
            lin = nn.Linear(W.shape[1], W.shape[0], bias=False).double()
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(W))
            setattr(self, name, lin)

    def forward(self, x, target=None):
        for name in NAMES:
            x = getattr(self, name)(x)
        loss = None if target is None else 0.5 * ((x - target) ** 2).sum()
        return SimpleNamespace(logits=x, loss=loss)


def weights(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((d_out, d_in)) / np.sqrt(d_in) for d_in, d_out in DIMS]


def trained_engine_model(seed=0):
    """An engine PeftModel trained a few steps with allocation, one layer forced to rank 0."""
    cfg = AdaLoraConfig(target_modules=NAMES, init_r=4, target_r=2, tinit=1, tfinal=1, total_step=6,
                        lora_alpha=16)
    pm = get_peft_model(Chain(weights(seed)), cfg, seed=seed)
    ctl = pm.controllers[0]
    rng = np.random.default_rng(seed + 1)
    x, target = rng.standard_normal((8, 6)), rng.standard_normal((8, 4))
    for step in range(5):
        pm.zero_grad()
        y = pm.forward(x)
        pm.backward(y - target)  # L = ½||y − t||²
        ctl.regularize()
        for _, m, k in pm.named_parameters(trainable_only=True):
            m.params[k] -= 0.05 * m.grads[k]
        ctl.after_optimizer_step(step)
    layers = dict(pm.adapter_layers())
    layers["base_model.model.l2"].apply_mask([False] * 4)  # a rank-0 module (PEFT #1539)
    return pm, x, target


def test_save_writes_peft_layout_resized(tmp_path):
    pm, _, _ = trained_engine_model()
    save_adapter(pm, tmp_path)
    arrays = load_safetensors(tmp_path / "adapter_model.safetensors")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA"
    layers = dict(pm.adapter_layers())
    assert set(cfg["rank_pattern"]) == {f"{n}.lora_E" for n in NAMES}
    for name, (d_in, d_out) in zip(NAMES, DIMS):
        layer = layers[f"base_model.model.{name}"]
        keep = np.array(cfg["rank_pattern"][f"{name}.lora_E"])
        assert keep.tolist() == layer.pattern
        r = int(keep.sum())
        assert arrays[f"base_model.model.{name}.lora_A"].shape == (r, d_in)
        assert arrays[f"base_model.model.{name}.lora_E"].shape == (r, 1)
        assert arrays[f"base_model.model.{name}.lora_B"].shape == (d_out, r)
        assert np.array_equal(arrays[f"base_model.model.{name}.lora_A"], to_host(layer.params["lora_A"])[keep])
        assert np.array_equal(arrays[f"base_model.model.{name}.lora_E"], to_host(layer.params["lora_E"])[keep])
        assert np.array_equal(arrays[f"base_model.model.{name}.lora_B"], to_host(layer.params["lora_B"])[:, keep])
    assert sum(map(sum, cfg["rank_pattern"].values())) <= 2 * 3
    assert sum(cfg["rank_pattern"]["l2.lora_E"]) == 0


def test_engine_file_loads_in_peft_with_the_same_loss_and_gradients(tmp_path):
    pm, x, target = trained_engine_model()
    y_ours = to_host(pm.forward(x)).copy()
    save_adapter(pm, tmp_path)
    tmodel = peft.PeftModel.from_pretrained(TorchChain(weights()), str(tmp_path), is_trainable=True).double()
    # AdaLoraModel.forward adds the regulariser (task-type PeftModels call it; the plain
    # PeftModel.forward calls the wrapped model directly and skips it, cf. PEFT #432)
    out = tmodel.base_model(torch.from_numpy(x), torch.from_numpy(target))
    assert_close(out.logits.detach().numpy(), y_ours, "logits (PEFT loading the engine's file)", 1e-10)
    # the loaded engine model: same outputs, and loss + orth reg and gradients as PEFT's forward/backward
    pm2 = load_peft_model(Chain(weights()), tmp_path)
    assert [m.r for _, m in pm2.adapter_layers()] == [sum(m.pattern) for _, m in pm.adapter_layers()]
    pm2.zero_grad()
    y = pm2.forward(x)
    assert_close(y, y_ours, "logits (engine loading its own file)", 1e-12)
    loss = 0.5 * float(np.sum((to_host(y) - target) ** 2))
    pm2.backward(y - target)
    loss += pm2.controllers[0].regularize()
    out.loss.backward()
    assert_close(np.array(loss), out.loss.detach().numpy(), "loss incl. orth_reg_weight·R", 1e-10)
    grads = pm2.named_grads()
    n_checked = 0
    for n, p in tmodel.named_parameters():
        if p.requires_grad and p.numel() > 0 and ".ranknum." not in n:
            key = n.replace(".default", "")
            assert_close(grads[key], p.grad.numpy(), f"d{key}", 1e-10)
            n_checked += 1
    assert n_checked == 6  # A, E, B of l0 and l1 (l2 has rank 0)


def test_peft_file_loads_in_the_engine(tmp_path):
    torch.manual_seed(0)
    tmodel = peft.get_peft_model(TorchChain(weights(3)), peft.AdaLoraConfig(
        target_modules=NAMES, init_r=3, target_r=1, tinit=1, tfinal=1, total_step=5)).double()
    rng = np.random.default_rng(2)
    x, target = torch.from_numpy(rng.standard_normal((4, 6))), torch.from_numpy(rng.standard_normal((4, 4)))
    # only A, E, B: with a float64 base PEFT 0.21.2 leaves ranknum requires_grad=True, and an
    # optimizer over it would change the scale (ranknum is fixed, and it is not saved)
    opt = torch.optim.SGD([p for n, p in tmodel.named_parameters() if ".lora_" in n], lr=0.5)
    for step in range(5):
        out = tmodel(x, target)
        out.loss.backward()
        opt.step()
        tmodel.base_model.update_and_allocate(step)
        opt.zero_grad()
    tmodel.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] is not None
    ref = tmodel(x).logits.detach().numpy()
    pm = load_peft_model(Chain(weights(3)), tmp_path)
    ranks = [m.r for _, m in pm.adapter_layers()]
    assert sum(ranks) == 3  # target_r · n, resized
    assert_close(pm.forward(x.numpy()), ref, "logits (engine loading PEFT's file)", 1e-10)


def test_rank_pattern_round_trips_through_the_config():
    pattern = {"l0.lora_E": [True, False, True, False], "l2.lora_E": [False] * 4}
    cfg = AdaLoraConfig(target_modules=NAMES, init_r=4, target_r=1, total_step=3, rank_pattern=pattern)
    again = AdaLoraConfig.from_json_dict(json.loads(json.dumps(cfg.to_json_dict())))
    assert again.rank_pattern == pattern
    pm = get_peft_model(Chain(weights()), again)
    assert [m.r for _, m in pm.adapter_layers()] == [2, 4, 0]
    assert all(m.ranknum == 4.0 for _, m in pm.adapter_layers())
    with pytest.raises(ValueError, match="rank_pattern"):
        AdaLoraConfig(target_modules=NAMES, init_r=4, target_r=1, total_step=3, rank_pattern={"l0.lora_E": [True]})


def test_loading_a_mismatched_array_installs_nothing():
    rng = np.random.default_rng(0)
    layer = AdaLoraLinear(Linear(rng.standard_normal((5, 6))), r=3, lora_alpha=8, ranknum=3, rng=rng)
    before = {k: v.copy() for k, v in layer.params.items()}
    bad = {"lora_A": np.ones((3, 6)), "lora_E": np.ones((3, 1)), "lora_B": np.ones((5, 2))}
    with pytest.raises(ValueError, match="lora_B"):
        layer.load_peft_state_dict(bad)
    for k in before:
        assert np.array_equal(layer.params[k], before[k])


def test_reference_command_with_an_adalora_adapter_matches_torch_peft(tmp_path):
    """`spectral-peft reference --adapter`: logits, loss (with orth_reg_weight·R) and adapter
    gradients of a PEFT-trained, resized GPT-2 AdaLoRA adapter, against torch + PEFT in float64."""
    transformers = pytest.importorskip("transformers", reason="transformers: the Hugging Face model peer these comparisons run against")
    from spectral_peft.oracle import reference

    torch.manual_seed(0)
    hcfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=16, vocab_size=50, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(hcfg).double()
    mdir, adir = tmp_path / "model", tmp_path / "adapter"
    hf.save_pretrained(str(mdir))
    pm = peft.get_peft_model(hf, peft.AdaLoraConfig(
        task_type="CAUSAL_LM", target_modules=["c_attn", "c_proj", "c_fc"], init_r=4, target_r=2, tinit=1, tfinal=1,
        total_step=6, orth_reg_weight=0.3)).double()
    opt = torch.optim.SGD([p for n, p in pm.named_parameters() if ".lora_" in n], lr=0.5)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 50, size=(2, 8)))
    for step in range(6):
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.save_pretrained(str(adir))

    res = reference(str(mdir), {"input_ids": ids.numpy(), "labels": ids.numpy()}, str(adir))

    fresh = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(str(mdir)).double(),
                                           str(adir), is_trainable=True).double().eval()
    logits = fresh(input_ids=ids).logits
    V = logits.shape[-1]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    # PEFT's AdaLoraModel.forward regulariser (HF's own causal-LM loss is computed in float32, so
    # the float64 loss is rebuilt here; PEFT's own float32 total is checked at 1e-6 below)
    mats = [(n, p) for n, p in fresh.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    reg = sum(torch.norm((p @ p.T if ".lora_A." in n else p.T @ p) - torch.eye(p.shape[0] if ".lora_A." in n
                         else p.shape[1], dtype=p.dtype), p="fro") for n, p in mats) / len(mats)
    loss = ce + 0.3 * reg
    loss.backward()
    assert_close(res["logits"], logits.detach().numpy(), "logits", 1e-10)
    assert_close(res["loss"], loss.detach().numpy(), "loss incl. 0.3·R", 1e-10)
    peft_loss = fresh(input_ids=ids, labels=ids).loss  # through AdaLoraModel.forward (task type CAUSAL_LM)
    assert_close(res["loss"], peft_loss.detach().numpy(), "PEFT's own loss (float32 cross-entropy)", 1e-6)
    checked = 0
    for n, p in fresh.named_parameters():
        if ".lora_" in n:
            key = "grad." + n.replace(".default", "")
            assert_close(res[key], p.grad.numpy(), key, 1e-10)
            checked += 1
    assert checked == 3 * 8  # A, E, B of 8 adapted matrices


def test_trainer_runs_the_allocator_without_manual_wiring():
    """The engine's Trainer calls regularize() and after_optimizer_step() itself (PEFT #1327)."""
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=8, vocab_size=40, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg, get_backend("cpu", "float64"), seed=0)
    acfg = AdaLoraConfig(target_modules=["c_attn", "c_fc"], init_r=3, target_r=1, tinit=1, tfinal=2, total_step=8)
    pm = get_peft_model(model, acfg, seed=0)
    trainer = Trainer(pm, SGD(pm, lr=0.1))
    rng = np.random.default_rng(0)
    for _ in range(8):
        ids = rng.integers(0, 40, size=(2, 8))
        data_loss = float(pm.forward(ids, labels=ids).loss)
        pm.clear_cache()
        reg = orth_regularizer([m for _, m in pm.adapter_layers()], acfg.orth_reg_weight, accumulate=False)
        metrics = trainer.train_step({"input_ids": ids, "labels": ids})
        # the logged loss is the data loss plus orth_reg_weight·R, before the update
        assert abs(metrics["loss"] - (data_loss + reg)) <= 1e-12 * abs(data_loss + reg)
        assert reg > 0
    ctl = pm.controllers[0]
    assert [h[0] for h in ctl.history] == [2, 3, 4, 5, 6, 7]  # t > tinit, deltaT = 1, then the frozen phase
    assert all(kept == budget for _, budget, kept in ctl.history)
    assert ctl.history[-1][1] == 4  # target_r · n
    assert sum(map(sum, ctl.rank_pattern().values())) == 4


def test_resizing_a_model_to_its_pattern_keeps_outputs_and_counts():
    from spectral_peft.adapters.adalora import rank_pattern_of, resize_to_rank_pattern

    pm, x, _ = trained_engine_model()
    pattern = rank_pattern_of(pm)
    y = to_host(pm.forward(x)).copy()
    assert pm.num_parameters(trainable_only=True) == sum(4 * (d_in + d_out + 1) for d_in, d_out in DIMS)
    resize_to_rank_pattern(pm, pattern)
    assert_close(pm.forward(x), y, "logits after resizing", 1e-12)
    expected = sum(sum(pattern[f"{n}.lora_E"]) * (d_in + d_out + 1) for n, (d_in, d_out) in zip(NAMES, DIMS))
    assert pm.num_parameters(trainable_only=True) == expected
    with pytest.raises(KeyError, match="not AdaLoRA layers"):
        resize_to_rank_pattern(pm, {"nope.lora_E": [True]})


def test_merged_weights_equal_peft_merge_and_unload(tmp_path):
    """The engine's merge_and_unload of a trained, masked AdaLoRA model against PEFT's merge_and_unload
    of the same adapter loaded from the engine's file: every merged weight W + B(A⊙E)·α/ranknum equal
    in float64 (≤ 1e-12 relative), the rank-0 module's weight left exactly as the base."""
    from spectral_peft.adapters.peft_model import merge_and_unload

    pm, x, _ = trained_engine_model()
    y_adapted = to_host(pm.forward(x)).copy()
    save_adapter(pm, tmp_path)
    merged = merge_and_unload(pm)
    tmodel = peft.PeftModel.from_pretrained(TorchChain(weights()), str(tmp_path)).double()
    t_merged = tmodel.merge_and_unload()
    base = weights()
    for i, name in enumerate(NAMES):
        ours = to_host(getattr(merged, name).params["weight"])
        theirs = getattr(t_merged, name).weight.detach().numpy()
        assert_close(ours, theirs, f"merged {name}.weight", 1e-12)
        if name == "l2":  # rank 0: nothing to add
            assert np.array_equal(ours, base[i])
        else:
            assert not np.allclose(ours, base[i]), f"{name}: the merge added nothing"
    assert_close(to_host(merged.forward(x)), y_adapted, "merged model output", 1e-12)
