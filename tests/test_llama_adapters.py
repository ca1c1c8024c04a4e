"""Every method on the LLaMA family, and `reference` with an adapter on Llama, Mistral and Qwen2.

1. `reference --adapter DIR` equals torch + PEFT (the transformers peer made float64,
   tests/_llama.py) on logits, loss and the gradient of every adapter parameter, <= 1e-10 in
   float64: LoRA, rsLoRA, DoRA and AdaLoRA adapters written by PEFT, targeting every projection
   (q, k, v, o, gate, up, down_proj) across the cases; RoSA (no third-party peer: peft-rosa is a
   fork) against transformers with W + S as its base weight and PEFT's LoRA on top, where the
   gradient of S's values is the base weight's gradient on the support.
2. Every method of the registry (the LoRA family, AdaLoRA, RoSA, QLoRA, QRoSA) on a Llama base:
   central differences of the whole model's loss in every trainable parameter (float64), training
   lowers the loss, and the saved adapter reloads to the same logits.
"""
import numpy as np
import pytest

from spectral_peft.adapters.dora import DoraLinear
from spectral_peft.adapters.dylora import DyLoraLinear
from spectral_peft.adapters.peft_model import get_peft_model, load_peft_model
from spectral_peft.adapters.registry import METHODS, recipe
from spectral_peft.adapters.rosa import RosaConfig
from spectral_peft.adapters.rosa_layer import RosaLinear
from spectral_peft.backend import get_backend, to_host
from spectral_peft.cli import main as cli_main
from spectral_peft.commands.run_options import RunConfig
from spectral_peft.io.safe import load_safetensors, save_safetensors
from spectral_peft.model import load_pretrained, save_pretrained
from spectral_peft.optim import make_adamw
from spectral_peft.oracle import reference
from spectral_peft.quant import quantize_model
from spectral_peft.testing import assert_close, numerical_gradient
from spectral_peft.train import SeededBatches, Trainer

torch = pytest.importorskip("torch", reason="torch: the autograd peer these comparisons run against")
transformers = pytest.importorskip("transformers", reason="transformers: the Hugging Face model peer")
peft = pytest.importorskip("peft", reason="peft: the PEFT peer these comparisons run against")
from _llama import causal_lm_loss, float64_peer, peer_forward, peer_model  # noqa: E402
from test_llama import V, build, padded_batch, tiny  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def file_key(peft_name: str) -> str:
    """PEFT's parameter name -> its adapter-file key (the adapter name dropped, as PEFT saves)."""
    return (peft_name.replace(".default.weight", ".weight").replace(".default", "")
            .replace("lora_magnitude_vector.weight", "lora_magnitude_vector"))


def write_model(tmp_path, family, **kw):
    d = tmp_path / "model"
    save_pretrained(build(tiny(family, **kw), seed=3), d)
    return d


def write_inputs(tmp_path, seed=0):
    ids, mask, labels = padded_batch(seed, 3, 7, left=True)
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    save_safetensors(inputs, tmp_path / "in.safetensors")
    return inputs


def adalora_orth_reg(pm, weight):
    """PEFT's AdaLoraModel.forward regulariser, written out: the mean over lora_A, lora_B of
    ||P Pᵀ - I||_F (A) / ||Pᵀ P - I||_F (B), times orth_reg_weight."""
    total, n = 0.0, 0
    for name, p in pm.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and p.requires_grad:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            total = total + torch.norm(cov - torch.eye(*cov.shape, dtype=cov.dtype), p="fro")
            n += 1
    return weight * total / n


PEFT_CASES = [
    ("llama", "lora", ALL, {"attention_bias": True, "mlp_bias": True}),
    ("mistral", "rslora", ["q_proj", "v_proj", "down_proj"], {"sliding_window": 3}),
    ("qwen2", "dora", ["k_proj", "o_proj", "gate_proj", "up_proj"], {"tie_word_embeddings": True}),
    ("llama", "dora", ALL, {}),
    ("qwen2", "adalora", ALL, {}),
    ("mistral", "adalora", ["q_proj", "up_proj"], {}),
]


@pytest.mark.parametrize("family,method,targets,kw", PEFT_CASES, ids=[f"{c[0]}-{c[1]}" for c in PEFT_CASES])
def test_reference_with_a_peft_adapter_equals_torch_peft(tmp_path, family, method, targets, kw):
    mdir = write_model(tmp_path, family, **kw)
    inputs = write_inputs(tmp_path)
    tm = peer_model(mdir)
    torch.manual_seed(5)
    if method == "adalora":
        pcfg = peft.AdaLoraConfig(init_r=3, target_r=2, target_modules=targets, total_step=10, tinit=1, tfinal=2,
                                  orth_reg_weight=0.3)
    else:
        pcfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=targets, init_lora_weights=False,
                               use_rslora=method == "rslora", use_dora=method == "dora")
    with float64_peer():
        pm = peft.get_peft_model(tm, pcfg).eval()
    if method == "adalora":  # PEFT starts lora_E at zero: draw it, so the triplets matter
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_E" in name:
                    p.copy_(torch.randn_like(p))
    adir = tmp_path / "adapter"
    pm.save_pretrained(str(adir))
    res = reference(mdir, inputs, adir)
    t_out = peer_forward(pm, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    loss = causal_lm_loss(t_out.logits, inputs["labels"])
    if method == "adalora":
        loss = loss + adalora_orth_reg(pm, pcfg.orth_reg_weight)
    loss.backward()
    real = inputs["attention_mask"].astype(bool)
    assert_close(res["logits"][real], t_out.logits.detach().numpy()[real], "logits", 1e-10)
    assert_close(res["loss"], np.array(loss.item()), "loss", 1e-10)
    # AdaLoRA's ranknum is a constant (PEFT leaves it requires_grad after get_peft_model; it is never trained)
    expected = {f"grad.{file_key(n)}": p.grad.numpy() for n, p in pm.named_parameters()
                if p.requires_grad and "ranknum" not in n}
    got = {k: v for k, v in res.items() if k.startswith("grad.")}
    assert set(got) == set(expected), f"gradient keys differ: {sorted(set(got) ^ set(expected))}"
    for k, g in expected.items():
        assert_close(got[k], g, k, 1e-10)


def _rosa_model(mdir, targets, seed=0):
    """An engine RoSA adapter on the model of ``mdir`` with a random support, values and A, B."""
    model = load_pretrained(mdir, get_backend("cpu", "float64"))
    pm = get_peft_model(model, RosaConfig(r=2, d=0.25, lora_alpha=3, target_modules=targets, schedule="default"))
    rng = np.random.default_rng(seed)
    for _, layer in pm.adapter_layers():
        assert isinstance(layer, RosaLinear)
        d_out, d_in = layer.shape
        mask = np.zeros(d_out * d_in, dtype=bool)
        mask[rng.choice(d_out * d_in, layer.nnz, replace=False)] = True
        layer.set_support(mask.reshape(d_out, d_in))
        for key in layer.params:
            if key != "weight" and key != "bias":
                layer.params[key][...] = rng.standard_normal(layer.params[key].shape)
    return pm


def test_reference_with_a_rosa_adapter_equals_torch_with_w_plus_s(tmp_path):
    targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
    mdir = write_model(tmp_path, "llama", attention_bias=True)
    inputs = write_inputs(tmp_path, seed=2)
    ours = _rosa_model(mdir, targets)
    adir = tmp_path / "adapter"
    ours.save_pretrained(adir)
    res = reference(mdir, inputs, adir)
    # the peer: W + S as the base weight (S dense from the engine's file), PEFT's LoRA with its A, B
    tm = peer_model(mdir)
    arrays = load_safetensors(adir / "adapter_model.safetensors")
    with float64_peer():
        pm = peft.get_peft_model(tm, peft.LoraConfig(r=2, lora_alpha=3, target_modules=targets))
    supports = {}
    with torch.no_grad():
        for name, module in pm.named_modules():
            if not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
                continue
            key = name  # base_model.model.model.layers.i....
            offs, cols = arrays[f"{key}.rosa_spa.row_offs"], arrays[f"{key}.rosa_spa.col_idx"].astype(np.int64)
            rows = np.repeat(np.arange(len(offs) - 1), np.diff(offs))
            W = module.base_layer.weight
            S = np.zeros(tuple(W.shape))
            S[rows, cols] = arrays[f"{key}.rosa_spa.values"]
            W += torch.tensor(S)
            W.requires_grad_(True)
            module.lora_A["default"].weight.copy_(torch.tensor(arrays[f"{key}.rosa_A.weight"]))
            module.lora_B["default"].weight.copy_(torch.tensor(arrays[f"{key}.rosa_B.weight"]))
            supports[key] = (W, rows, cols, module)
    assert len(supports) == 2 * len(targets)
    t_out = peer_forward(pm, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    loss = causal_lm_loss(t_out.logits, inputs["labels"])
    loss.backward()
    real = inputs["attention_mask"].astype(bool)
    assert_close(res["logits"][real], t_out.logits.detach().numpy()[real], "logits", 1e-10)
    assert_close(res["loss"], np.array(loss.item()), "loss", 1e-10)
    for key, (W, rows, cols, module) in supports.items():
        assert_close(res[f"grad.{key}.rosa_spa.values"], W.grad.numpy()[rows, cols], f"{key} values", 1e-10)
        assert_close(res[f"grad.{key}.rosa_A.weight"], module.lora_A["default"].weight.grad.numpy(), f"{key} A", 1e-10)
        assert_close(res[f"grad.{key}.rosa_B.weight"], module.lora_B["default"].weight.grad.numpy(), f"{key} B", 1e-10)


def test_reference_on_a_llama_bad_input_is_one_line_and_no_output(tmp_path, capsys):
    mdir = write_model(tmp_path, "llama")
    save_safetensors({"input_ids": np.array([[1, V]])}, tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    capsys.readouterr()
    rc = cli_main(["reference", "--model", str(mdir), "--inputs", str(tmp_path / "in.safetensors"), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists() and len(err) == 1 and f"token id {V}" in err[0]


# --- every method of the registry on a Llama base ---------------------------------------------------

SIZES = {"r": 2, "init_r": 3, "d": 0.2}


def method_model(name, seed=0):
    """A tiny Llama (GQA, biases, hidden 32 so 4-bit blocks of 32 fit) with ``name``'s adapters on
    every projection, RoSA supports drawn at random and every adapter parameter non-zero."""
    base = build(tiny("llama", hidden_size=32, intermediate_size=48, attention_bias=True, initializer_range=0.3), seed=seed)
    rec = recipe(name)
    opts = RunConfig(steps=8, r=2, target_modules=",".join(ALL), spa_num_grads=1, deltaT=1, blocksize=32)
    if rec.quantized:
        quantize_model(base, quant_type=opts.quant_type, blocksize=opts.blocksize,
                       compress_statistics=opts.compress_statistics)
    conf = rec.make_config(opts, SIZES[rec.knob])
    pm = get_peft_model(base, conf, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for _, layer in pm.adapter_layers():
        if isinstance(layer, RosaLinear) and layer.nnz:
            d_out, d_in = layer.shape
            mask = np.zeros(d_out * d_in, dtype=bool)
            mask[rng.choice(d_out * d_in, layer.nnz, replace=False)] = True
            layer.set_support(mask.reshape(d_out, d_in))
        for key, a in layer.params.items():
            if key not in ("weight", "bias") and key not in layer.frozen and a.dtype.kind == "f":
                a[...] = rng.standard_normal(a.shape) * 0.3 + (1.0 if "magnitude" in key else 0.0)
    return pm


# the methods that adapt linears (prefix and prompt tuning adapt none: their central differences,
# training and reload on Llama are in tests/test_prefix_tuning.py and tests/test_prompt_tuning.py)
ADAPTER_METHODS = [m for m in METHODS if m != "full" and recipe(m).knob != "num_virtual_tokens"]


@pytest.mark.parametrize("name", ADAPTER_METHODS)
def test_every_method_on_llama_has_the_central_difference_gradient(name):
    pm = method_model(name)
    pm.eval()  # DyLoRA draws a rank per training step; evaluation uses the full rank, a fixed function
    for _, layer in pm.adapter_layers():
        if isinstance(layer, DoraLinear):  # the method detaches the norm: differentiate with it fixed
            layer.weight_norm = (lambda n: (lambda: n))(layer.weight_norm())
        if isinstance(layer, DyLoraLinear):  # "frozen" mode keeps one rank's slice of the true gradient
            layer.mode = "full"  # (tests/test_dylora.py proves the slice); "full" is all of it
    ids, mask, labels = padded_batch(1, 2, 6, left=False)
    pm.forward(ids, attention_mask=mask, labels=labels)
    pm.zero_grad()
    pm.backward()
    rng = np.random.default_rng(0)
    checked = 0
    for pname, m, k in pm.named_parameters(trainable_only=True):
        flat = m.params[k].reshape(-1)
        idx = rng.choice(flat.size, size=min(2, flat.size), replace=False)
        view = flat[idx].copy()
        g = m.grads.get(k)
        analytic = np.zeros(len(idx)) if g is None else to_host(g).reshape(-1)[idx]

        def f():
            flat[idx] = view
            return pm.forward(ids, attention_mask=mask, labels=labels).loss

        num = numerical_gradient(f, view)
        flat[idx] = view
        assert_close(analytic, num, f"{name}: d{pname}", 1e-6, atol=1e-9)
        checked += 1
    assert checked >= 14, f"{name}: only {checked} trainable tensors"


@pytest.mark.parametrize("name", ADAPTER_METHODS)
def test_every_method_on_llama_trains_and_its_adapter_reloads(tmp_path, name):
    pm = method_model(name, seed=2)
    tokens = (np.arange(400) * 3 + np.arange(400) // 5) % V  # a learnable sequence (random ids are not)
    batches = SeededBatches(tokens[:300], 4, 8, seed=1)
    evals = [next(iter(SeededBatches(tokens[300:], 4, 8, seed=9)))]
    opt, sched = make_adamw(pm, 3e-2, 0.0, 30)
    trainer = Trainer(pm, opt, sched)
    before = trainer.evaluate(evals)
    trainer.fit(batches, 30)
    after = trainer.evaluate(evals)
    assert after < before, f"{name}: eval loss {before:.4f} -> {after:.4f}"
    pm.eval()
    ids = np.arange(12).reshape(2, 6) % V
    logits = pm.forward(ids).logits.copy()
    pm.save_pretrained(tmp_path / "adapter")
    base = _fresh_base(name)
    if name == "deltalora":  # Delta-LoRA moved the base weights: they belong to the model, not the adapter file
        for path, layer in pm.adapter_layers():
            base.get_submodule(path.removeprefix("base_model.model.")).params["weight"][...] = layer.base_layer.params["weight"]
    reloaded = load_peft_model(base, tmp_path / "adapter")
    reloaded.eval()
    assert_close(reloaded.forward(ids).logits, logits, f"{name}: reloaded logits", 1e-12)


def _fresh_base(name):
    """The base method_model(name, seed=2) starts from (quantised the same way), without adapters."""
    base = build(tiny("llama", hidden_size=32, intermediate_size=48, attention_bias=True, initializer_range=0.3), seed=2)
    if recipe(name).quantized:
        opts = RunConfig(blocksize=32)
        quantize_model(base, quant_type=opts.quant_type, blocksize=opts.blocksize,
                       compress_statistics=opts.compress_statistics)
    return base
