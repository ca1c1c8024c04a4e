"""LongLoRA (adapters/longlora.py): S2-Attn in training, full attention in evaluation, LoRA plus
PEFT's modules_to_save, and the context extension.

Already proven in tests/test_ops_s2attn.py and not repeated here: S2-Attn with G < T equals a dense
(T, T) mask that is block-diagonal with the shifted half (PyTorch autograd, forward and backward,
padded and causal); its gradients by finite differences; an odd G or one not dividing T refused;
the unshifted heads with G = T equal causal full attention. Added here: G = T without a causal mask
equals full attention on every head; the grouped-query path (k, v with fewer heads) against the
same dense reference; the whole LongLoRA model by float64 central differences; the budget formula;
PEFT's files both ways (modules_to_save keys); refusals before any work.

Tolerances: float64 forward comparisons 1e-12 relative (the same products in another order);
central differences rtol 1e-6 (GRADCHECK_RTOL) with atol 1e-9; PEFT parity 1e-10.
"""
import json

import numpy as np
import pytest
from test_ops_s2attn import allowed_mask, torch_dense_reference

from spectral_peft.adapters.longlora import (
    ATTENTION_TARGETS,
    MODULES_TO_SAVE,
    LongLoraConfig,
    extend_context,
    interpolate_positions,
    saved_parameter_count,
)
from spectral_peft.adapters.lora import LoraConfig, modules_to_save_parameter_count
from spectral_peft.adapters.peft_model import (
    adapted_shapes,
    get_peft_model,
    load_peft_model,
    save_adapter,
)
from spectral_peft.backend import get_backend, to_host
from spectral_peft.commands.pretrain import new_base
from spectral_peft.commands.run_options import RunConfig
from spectral_peft.io.safe import load_safetensors
from spectral_peft.model import save_pretrained
from spectral_peft.ops import attention_backward, attention_forward
from spectral_peft.testing import GRADCHECK_RTOL, assert_close, numerical_gradient

torch = pytest.importorskip("torch", reason="torch: the autograd peer")
transformers = pytest.importorskip("transformers", reason="transformers: the Hugging Face model peer")
peft = pytest.importorskip("peft", reason="peft: the PEFT peer of the adapter files")
transformers.logging.set_verbosity_error()

F64 = get_backend("cpu", "float64")


def options(arch, **kw):
    kw = {"n_layer": 2, "n_embd": 16, "n_head": 4, "n_positions": 16, "r": 2, **kw}
    return RunConfig(arch=arch, **kw)


def longlora_model(arch, seed=0, **kw):
    """A tiny base of the run's architecture with LongLoRA at r = 2, every trainable entry non-zero."""
    o = options(arch, **kw)
    saved = ["wpe", *MODULES_TO_SAVE] if arch == "gpt2" else MODULES_TO_SAVE  # as --longlora_context trains
    pm = get_peft_model(new_base(o, F64), LongLoraConfig.for_run(o, 2, target_modules=ATTENTION_TARGETS, modules_to_save=saved), seed=seed)
    rng = np.random.default_rng(seed + 1)
    for _, m in pm.adapter_layers():
        for k in ("lora_A.weight", "lora_B.weight"):
            m.params[k][...] = rng.standard_normal(m.params[k].shape) * 0.3
    return pm, o


# --- S2-Attn: what test_ops_s2attn.py does not cover ------------------------------------------------
def test_s2_attention_with_one_group_and_no_causal_mask_is_full_attention():
    """G = T, not causal: each head attends to every key; the shifted heads' roll permutes keys and
    queries together and is undone, so every head equals full attention."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 4, 8, 3)) for _ in range(3))
    full, _ = attention_forward(q, k, v, False)
    s2, _ = attention_forward(q, k, v, False, shift_group=8)
    assert_close(s2, full, "S2-Attn at G = T (non-causal)", rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("causal", [False, True])
def test_s2_attention_with_grouped_kv_heads_matches_the_dense_mask(causal):
    """k, v of Hkv = H/2 heads: the op repeats them (head h reads kv head h // 2) and sums dk, dv
    back; the reference repeats them in torch and masks densely (test_ops_s2attn.allowed_mask)."""
    rng = np.random.default_rng(4)
    B, H, Hkv, T, hd, G = 2, 4, 2, 8, 3, 4
    q = rng.standard_normal((B, H, T, hd))
    k, v = (rng.standard_normal((B, Hkv, T, hd)) for _ in range(2))
    g = rng.standard_normal((B, H, T, hd))
    out, cache = attention_forward(q, k, v, causal, shift_group=G)
    dq, dk, dv = attention_backward(g, cache)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    tout = torch_dense_reference(tq, tk.repeat_interleave(H // Hkv, 1), tv.repeat_interleave(H // Hkv, 1),
                                 allowed_mask(B, H, T, G, causal, None))
    tout.backward(torch.tensor(g))
    for name, ours, theirs in (("out", out, tout), ("dq", dq, tq.grad), ("dk", dk, tk.grad), ("dv", dv, tv.grad)):
        theirs = theirs.detach().numpy()
        assert_close(ours, theirs, name, rtol=1e-10, atol=1e-12 * float(np.abs(theirs).max()))


# --- the whole model ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_longlora_model_gradients_by_central_differences(arch):
    """Training mode (S2-Attn at G = T/4 = 4 on T = 16): every trainable tensor (LoRA's A and B on
    the attention projections, the position table, every norm) against float64 central differences."""
    pm, _ = longlora_model(arch)
    pm.train()
    ids = np.random.default_rng(5).integers(0, 256, (2, 16))
    pm.forward(ids, labels=ids)
    pm.zero_grad()
    pm.backward()
    rng = np.random.default_rng(0)
    checked = set()
    for pname, m, k in pm.named_parameters(trainable_only=True):
        flat = m.params[k].reshape(-1)
        idx = rng.choice(flat.size, size=min(3, flat.size), replace=False)
        view = flat[idx].copy()
        analytic = to_host(m.grads[k]).reshape(-1)[idx]

        def f(flat=flat, idx=idx, view=view):
            flat[idx] = view
            return pm.forward(ids, labels=ids).loss

        num = numerical_gradient(f, view)
        flat[idx] = view
        assert_close(analytic, num, f"{arch}: d{pname}", GRADCHECK_RTOL, atol=1e-9)
        checked.add(pname.rsplit(".", 2)[-2] if "lora_" in pname else pname.split(".")[-2])
    assert {"lora_A", "lora_B"} <= checked
    assert ({"wpe", "ln_1", "ln_2", "ln_f"} if arch == "gpt2" else {"input_layernorm", "norm"}) <= checked


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_training_uses_s2_attn_and_evaluation_full_attention(arch):
    pm, _ = longlora_model(arch)
    ids = np.random.default_rng(6).integers(0, 256, (2, 16))
    layers = [m for _, m in pm.named_modules() if hasattr(m, "shift_group")]
    assert len(layers) == 2 and all(m.shift_group == 0.25 for m in layers)
    pm.eval()
    evaluated = pm.forward(ids).logits.copy()
    pm.train()
    trained = pm.forward(ids).logits.copy()
    pm.clear_cache()
    for m in layers:
        m.shift_group = None  # the same model with plain attention
    full = pm.forward(ids).logits
    assert_close(evaluated, full, "eval-mode logits vs full attention", rtol=1e-12, atol=1e-13)
    assert np.abs(trained - full).max() > 1e-3, "training mode should use S2-Attn"
    plain = pm.generate(ids[:, :5], max_new_tokens=3)
    for m in layers:
        m.shift_group = 0.25
    pm.train()  # generation evaluates (KV cache, full attention), even from a model left in training
    # mode: a 5-token prompt would give G = 1.25 under S2-Attn, which is refused
    out = pm.generate(ids[:, :5], max_new_tokens=3)
    assert np.array_equal(out.sequences, plain.sequences)
    assert_close(out.logits, plain.logits, "generation logits", rtol=0, atol=0)


def test_group_size_not_dividing_t_is_refused_before_any_work():
    pm, _ = longlora_model("gpt2")
    pm.train()
    before = {k: v.copy() for k, v in pm.state_dict().items()}
    for T, msg in ((12, "even divisor of T = 12"), (10, "not a whole number")):  # G = 3; G = 2.5
        with pytest.raises(ValueError, match=msg):
            pm.forward(np.zeros((1, T), dtype=np.int64))
        with pytest.raises(ValueError, match=r"group_size_ratio=0.25: the group size G = .* dividing T"):
            pm.peft_config.group_size(T)
    assert not pm.named_grads()
    assert all(np.array_equal(v, before[k]) for k, v in pm.state_dict().items())
    assert pm.peft_config.group_size(16) == 4
    with pytest.raises(ValueError, match="group_size_ratio=1.5 must be a float in"):
        LongLoraConfig(target_modules=["c_attn"], group_size_ratio=1.5)


# --- modules_to_save ------------------------------------------------------------------------------
def _structure(model):
    return {n: (type(m).__name__, sorted(m.frozen)) for n, m in model.named_modules()}


@pytest.mark.parametrize("names, msg", [
    (["nosuch", "neither"], r"modules_to_save \['nosuch', 'neither'\] names no module of the model"),
    (["wte"], "holds the tied embedding 'transformer.wte.weight'"),
    (["attn"], "overlaps the LoRA target"),
])
def test_bad_modules_to_save_is_refused_before_any_work(names, msg):
    model = new_base(options("gpt2"), F64)
    before = _structure(model)
    with pytest.raises(ValueError, match=msg):
        get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=names))
    assert _structure(model) == before
    with pytest.raises(ValueError, match="must be a list of strings"):
        LoraConfig(r=2, target_modules=["c_attn"], modules_to_save="wpe")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("extended", [False, True])
def test_budget_formula_equals_the_built_model(arch, extended):
    """LoRA's count + the modules_to_save count, in closed form (written out here from the shapes),
    equals the built model's trainable count; the extended GPT-2 also trains its position table."""
    for kw in ({}, {"n_layer": 3, "n_embd": 24, "n_positions": 32}):
        o = options(arch, **kw)
        base = new_base(o, F64)
        C, L, T = o.n_embd, o.n_layer, o.n_positions
        saved, extra = list(MODULES_TO_SAVE), 0
        if extended:
            extend_context(base, 2)
            T = 2 * T
            if arch == "gpt2":
                saved, extra = ["wpe", *saved], T * C
        measured = modules_to_save_parameter_count(base, saved)
        assert saved_parameter_count(arch, L, C, T if extra else 0) == measured
        # the run hands the shapes of every linear it adapts (MLP too); the config keeps the attention ones
        shapes = adapted_shapes(base, o.target_list())
        conf = LongLoraConfig.for_run(o, 3, target_modules=ATTENTION_TARGETS, modules_to_save=saved, extra_numel=extra)
        pm = get_peft_model(base, conf)
        if arch == "gpt2":  # c_attn C -> 3C, attn.c_proj C -> C; 2L + 1 LayerNorms of 2C; wpe T·C
            expected = L * 3 * ((C + 3 * C) + 2 * C) + (2 * L + 1) * 2 * C + extra
        else:  # q, o: C -> C; k, v: C -> C/2 (Hkv = H/2); 2L + 1 RMSNorms of C
            expected = L * 3 * (2 * 2 * C + 2 * (C + C // 2)) + (2 * L + 1) * C
        assert conf.parameter_count(shapes) == expected == pm.trainable_parameter_count()


def _gpt2_dir(tmp_path):
    o = options("gpt2")
    save_pretrained(new_base(o, F64), tmp_path / "base")
    return tmp_path / "base"


def _randomise_saved(pm, seed=7):
    rng = np.random.default_rng(seed)
    for path in pm.saved_modules:
        for _, m, k in pm.model.get_submodule(path).named_parameters():
            m.params[k][...] += rng.standard_normal(m.params[k].shape) * 0.1


def test_peft_loads_the_engine_file_with_the_same_logits(tmp_path):
    from spectral_peft.model import load_pretrained

    base_dir = _gpt2_dir(tmp_path)
    conf = LoraConfig(r=2, lora_alpha=4, target_modules=ATTENTION_TARGETS, modules_to_save=["wpe", "ln_1", "ln_f"])
    pm = get_peft_model(load_pretrained(base_dir, F64), conf)
    for _, m in pm.adapter_layers():
        m.params["lora_B.weight"][...] = np.random.default_rng(1).standard_normal(m.params["lora_B.weight"].shape)
    _randomise_saved(pm)
    pm.eval()
    ids = np.random.default_rng(2).integers(0, 256, (2, 9))
    logits = pm.forward(ids).logits
    save_adapter(pm, tmp_path / "ad")
    keys = set(load_safetensors(tmp_path / "ad" / "adapter_model.safetensors"))
    assert {"base_model.model.transformer.wpe.weight", "base_model.model.transformer.h.0.ln_1.bias",
            "base_model.model.transformer.ln_f.weight"} <= keys
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["modules_to_save"] == ["wpe", "ln_1", "ln_f"]
    tm = transformers.GPT2LMHeadModel.from_pretrained(str(base_dir), attn_implementation="eager", dtype=torch.float64)
    pt = peft.PeftModel.from_pretrained(tm, str(tmp_path / "ad")).eval()
    theirs = pt(input_ids=torch.tensor(ids)).logits.detach().numpy()
    assert_close(logits, theirs, "logits (engine file in PEFT)", 1e-10)
    # and PEFT's own save of that model is the same key set, the same arrays
    pt.save_pretrained(str(tmp_path / "peft"))
    from safetensors.numpy import load_file

    peft_arrays = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert set(peft_arrays) == keys
    ours = load_safetensors(tmp_path / "ad" / "adapter_model.safetensors")
    for k in keys:
        assert_close(ours[k], peft_arrays[k], k, rtol=0, atol=0)


def test_the_engine_loads_peft_s_file_with_the_same_logits(tmp_path):
    from spectral_peft.model import load_pretrained

    base_dir = _gpt2_dir(tmp_path)
    tm = transformers.GPT2LMHeadModel.from_pretrained(str(base_dir), attn_implementation="eager", dtype=torch.float64)
    pt = peft.get_peft_model(tm, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False,
                                                 modules_to_save=["wpe", "ln_2"]))
    with torch.no_grad():
        for n, p in pt.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype) * 0.1)
    pt.eval().save_pretrained(str(tmp_path / "peft"))
    ids = np.random.default_rng(2).integers(0, 256, (2, 9))
    theirs = pt(input_ids=torch.tensor(ids)).logits.detach().numpy()
    pm = load_peft_model(load_pretrained(base_dir, F64), tmp_path / "peft")
    assert pm.saved_modules == ["transformer.wpe", "transformer.h.0.ln_2", "transformer.h.1.ln_2"]
    pm.eval()
    assert_close(pm.forward(ids).logits, theirs, "logits (PEFT file in the engine)", 1e-10)


def test_a_file_missing_a_saved_module_is_refused_and_the_model_untouched(tmp_path):
    from spectral_peft.io.safe import FileFormatError, save_safetensors
    from spectral_peft.model import load_pretrained

    base_dir = _gpt2_dir(tmp_path)
    pm = get_peft_model(load_pretrained(base_dir, F64), LoraConfig(r=2, target_modules=["c_attn"],
                                                                   modules_to_save=["wpe"]))
    save_adapter(pm, tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_model.safetensors"
    arrays = load_safetensors(path)
    del arrays["base_model.model.transformer.wpe.weight"]
    save_safetensors(arrays, path)
    model = load_pretrained(base_dir, F64)
    before = _structure(model)
    with pytest.raises(FileFormatError, match="transformer.wpe.weight"):
        load_peft_model(model, tmp_path / "ad")
    assert _structure(model) == before


# --- context extension ----------------------------------------------------------------------------
def test_gpt2_position_table_is_linearly_interpolated():
    W = np.arange(12, dtype=np.float64).reshape(4, 3) ** 2  # rows 0, 1, 2, 3 (squared: not linear in p)
    W2 = interpolate_positions(W, 2)
    assert W2.shape == (8, 3)
    assert np.array_equal(W2[::2], W)  # p = 2i: the old row i
    assert_close(W2[1::2][:3], (W[:-1] + W[1:]) / 2, "midpoints", rtol=1e-15)
    assert np.array_equal(W2[7], W[3])  # past the last old row: held


def test_extend_context_gpt2_and_llama():
    pm_base = new_base(options("gpt2"), F64)
    old = pm_base.transformer.wpe.params["weight"].copy()
    extend_context(pm_base, 4)
    assert pm_base.config.n_positions == 64 and pm_base.transformer.wpe.params["weight"].shape == (64, 16)
    assert np.array_equal(pm_base.transformer.wpe.params["weight"][::4], old)
    pm_base.forward(np.zeros((1, 64), dtype=np.int64))  # the longer context runs
    llama = new_base(options("llama"), F64)
    inv = llama.model.inv_freq.copy()
    extend_context(llama, 2)
    assert llama.config.rope_parameters["rope_type"] == "linear" and llama.config.rope_parameters["factor"] == 2.0
    assert llama.config.max_position_embeddings == 32
    assert_close(llama.model.inv_freq, inv / 2, "inv_freq / F", rtol=1e-15)
    with pytest.raises(ValueError, match="factor must be an int >= 2"):
        extend_context(llama, 1)


# --- the run option -------------------------------------------------------------------------------
def test_longlora_context_option_is_checked_before_any_work():
    with pytest.raises(ValueError, match=r"--longlora_context must be 0 \(off\) or an integer >= 2"):
        RunConfig(longlora_context=1).validate()
    with pytest.raises(ValueError, match="F·n_positions divisible by 8"):
        RunConfig(longlora_context=2, n_positions=10).validate()
    RunConfig(longlora_context=4).validate()


def test_run_with_longlora_context_reports_1x_2x_4x_and_draws_the_figure(tmp_path):
    from spectral_peft.commands.run import run

    cfg = RunConfig(methods="lora", steps=2, pretrain_steps=2, batch_size=2, n_positions=16, n_layer=1, n_embd=16,
                    n_head=2, eval_batches=1, eval_every=1, longlora_context=4, progress=False,
                    out=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))
    results, folder = run(cfg, log=lambda text="": None)
    rec = results["long_context"]
    assert rec["lengths"] == [16, 32, 64] and rec["T_train"] == 64 and rec["group_size"] == 16
    for name in ("extended base, no fine-tuning", "LongLoRA (S2-Attn)", "LoRA + modules_to_save, full attention"):
        assert sorted(rec["eval_loss"][name]) == ["16", "32", "64"]
        assert all(np.isfinite(v) for v in rec["eval_loss"][name].values())
    # LoRA r on c_attn, attn.c_proj + wpe (64 rows) + 3 LayerNorms, all of width 16
    assert rec["trainable_params"]["LongLoRA (S2-Attn)"] == 8 * (4 * 16 + 2 * 16) + 64 * 16 + 3 * 2 * 16
    assert "long_context.png" in results["figures"]
    import os

    assert os.path.getsize(os.path.join(folder, "long_context.png")) > 0
