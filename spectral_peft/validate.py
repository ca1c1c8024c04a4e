"""The `validate` command: side-by-side checks against whichever peers are installed.

Each check builds a small random case (seeded), runs it through spectral_peft and through a peer
(PyTorch autograd, transformers, PEFT, bitsandbytes), and compares every output and gradient:

    component            peer            max abs error   scaled error   tolerance   verdict

Errors follow spectral_peft.testing: an element passes when |a − e| <= atol + rtol·|e| with atol
= rtol·S, S = max|e| of that tensor (errors judged against the tensor's scale). The "scaled error"
column is the quantity that verdict uses, max over elements of |a − e| / (S + |e|): a row passes
exactly when it is <= rtol. (An elementwise |a − e| / |e| is not shown: near-zero entries make it
large on rows that pass.) A row covers all tensors of a check (output and every gradient) and
shows the worst of them. Tolerances: float64 against an independent float64 peer rtol 1e-10 (the
engine's promise); MiniLM in float32 rtol 1e-5; 4-bit codes must be identical.

A peer that is not installed is listed ("missing") rather than crashed on. Exit status: 0 when
every check that ran passed, 1 when one failed, 2 for bad arguments and when nothing was checked
(every chosen check's peer missing, e.g. ``--only rosa`` without peft-rosa: a run that checks
nothing must not read as a pass); then the last line, on stderr, says so.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import numpy as np

from . import cli, minilm, ops
from .adapters.adalora import AdaLoraLinear, orth_regularizer
from .adapters.lora import LoraConfig
from .adapters.registry import resolve
from .backend import get_backend
from .commands.contract import help_text
from .io.safe import load_safetensors, save_safetensors
from .model.hf import load_pretrained
from .module import Linear
from .quant import dequantize_4bit, quantize_4bit
from .testing import RTOL

F64 = RTOL["float64"]  # 1e-10
MINILM_RTOL = 1e-5


@dataclass
class Row:
    component: str
    peer: str
    max_abs: float
    scaled: float  # max |a − e| / (S + |e|), S = max|e| per tensor: the verdict's own measure
    tolerance: str
    verdict: str  # "PASS" / "FAIL"
    detail: str = ""


class Missing(Exception):
    """A peer is not available: listed, not run."""


def _quiet_peers() -> None:
    """Keep the peers' progress bars and load reports out of the table."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("transformers", "bitsandbytes", "peft", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _peer(name: str):
    _quiet_peers()
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a peer failing at import (e.g. a broken CUDA lib)
        raise Missing(f"{name} is not installed ({type(exc).__name__})") from None


def scaled_error(a: np.ndarray, e: np.ndarray, scale: float) -> float:
    """max over elements of |a − e| / (scale + |e|): the element test |a − e| <= rtol·scale +
    rtol·|e| holds everywhere exactly when this is <= rtol. An exact match where scale + |e| is 0
    counts 0; any other error there counts inf."""
    diff = np.abs(a - e)
    denom = scale + np.abs(e)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / denom)
    return float(np.nan_to_num(ratio, nan=math.inf, posinf=math.inf).max()) if ratio.size else 0.0


def compare(pairs: dict, rtol: float) -> tuple[float, float, bool, str]:
    """pairs: name -> (actual, expected). Returns (max abs error, max scaled error (see
    scaled_error), every tensor within tolerance, the names of the tensors out of tolerance)."""
    worst_abs, worst_scaled, bad = 0.0, 0.0, []
    # A tensor whose exact value is zero (BERT's key-bias gradient: softmax ignores a shift of
    # every score) holds only rounding noise: judge it against 1e-6 of the check's largest scale.
    floor = 1e-6 * max((float(np.abs(np.asarray(e, dtype=np.float64)).max()) for _, e in pairs.values()
                        if np.size(e)), default=0.0)
    for name, (a, e) in pairs.items():
        a = np.asarray(a, dtype=np.float64)
        e = np.asarray(e, dtype=np.float64)
        if a.shape != e.shape:
            return math.inf, math.inf, False, f"{name}: shape {a.shape} != {e.shape}"
        ab = float(np.abs(a - e).max()) if a.size else 0.0
        scale = max(float(np.abs(e).max()) if e.size else 0.0, floor)
        err = scaled_error(a, e, scale)
        if not err <= rtol:  # (a NaN error fails too)
            bad.append(name)
        worst_abs, worst_scaled = max(worst_abs, ab), max(worst_scaled, err)
    return worst_abs, worst_scaled, not bad, ", ".join(bad[:3])


def _row(component, peer, pairs, rtol, label=None) -> Row:
    ab, err, ok, worst = compare(pairs, rtol)
    return Row(component, peer, ab, err, label or f"rtol {rtol:g}", "PASS" if ok else "FAIL",
               "" if ok else f"out of tolerance: {worst}")


# ------------------------------------------------------------------------------------------------
# Ops against PyTorch autograd (float64)
# ------------------------------------------------------------------------------------------------
def _t(a, grad=True):
    torch = _peer("torch")
    return torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=grad)


def check_ops(rng) -> list[Row]:
    torch = _peer("torch")
    F = torch.nn.functional
    rows = []
    B, T, C, H, V = 2, 5, 8, 2, 11

    def run(name, engine_fwd, engine_bwd, torch_fn, inputs):
        ts = [_t(a) for a in inputs]
        y_t = torch_fn(*ts)
        dy = rng.standard_normal(tuple(y_t.shape))
        (y_t * torch.tensor(dy)).sum().backward()
        y, cache = engine_fwd(*inputs)
        grads = engine_bwd(dy, cache)
        grads = grads if isinstance(grads, tuple) else (grads,)
        pairs = {"out": (y, y_t.detach().numpy())}
        for i, (g, t_in) in enumerate(zip(grads, ts)):
            if g is not None:
                pairs[f"d{i}"] = (g, t_in.grad.numpy())
        rows.append(_row(name, "PyTorch autograd", pairs, F64))

    x = rng.standard_normal((B, T, C))
    W = rng.standard_normal((3 * C, C))
    b = rng.standard_normal(3 * C)
    run("ops.linear", lambda x_, W_, b_: ops.linear.linear_forward(x_, W_, b_),
        lambda dy, c: ops.linear.linear_backward(dy, c, W), lambda x_, W_, b_: F.linear(x_, W_, b_), [x, W, b])
    g, beta = rng.standard_normal(C), rng.standard_normal(C)
    run("ops.layernorm", lambda x_, g_, b_: ops.norm.layernorm_forward(x_, g_, b_, 1e-5),
        lambda dy, c: ops.norm.layernorm_backward(dy, c, g),
        lambda x_, g_, b_: F.layer_norm(x_, (C,), g_, b_, 1e-5), [x, g, beta])
    run("ops.gelu (tanh, GPT-2)", lambda x_: ops.activation.gelu_forward(x_, "tanh"), ops.activation.gelu_backward,
        lambda x_: F.gelu(x_, approximate="tanh"), [x])
    run("ops.gelu (erf, BERT)", lambda x_: ops.activation.gelu_forward(x_, "none"), ops.activation.gelu_backward,
        lambda x_: F.gelu(x_), [x])
    run("ops.softmax", lambda x_: ops.softmax.softmax_forward(x_, -1), ops.softmax.softmax_backward,
        lambda x_: torch.softmax(x_, -1), [x])
    q, k, v = (rng.standard_normal((B, H, T, C // H)) for _ in range(3))
    run("ops.attention (causal)", lambda q_, k_, v_: ops.attention.attention_forward(q_, k_, v_, True),
        ops.attention.attention_backward,
        lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, is_causal=True), [q, k, v])
    pad = np.ones((B, T), dtype=np.int64)
    pad[1, -2:] = 0
    run("ops.attention (padding)", lambda q_, k_, v_: ops.attention.attention_forward(q_, k_, v_, False, pad),
        ops.attention.attention_backward,
        lambda q_, k_, v_: F.scaled_dot_product_attention(
            q_, k_, v_, attn_mask=torch.tensor(pad, dtype=torch.bool)[:, None, None, :]), [q, k, v])
    # cross-entropy: a scalar output; dy is a scalar
    logits = rng.standard_normal((B * T, V))
    targets = rng.integers(0, V, B * T)
    targets[3] = -100
    lt = _t(logits)
    loss_t = F.cross_entropy(lt, torch.tensor(targets), ignore_index=-100)
    loss_t.backward()
    loss, cache = ops.loss.cross_entropy_forward(logits.copy(), targets, -100)
    dl = ops.loss.cross_entropy_backward(1.0, cache)
    dl = dl[0] if isinstance(dl, tuple) else dl
    rows.append(_row("ops.cross_entropy", "PyTorch autograd",
                     {"loss": (np.float64(loss), loss_t.item()), "dlogits": (dl, lt.grad.numpy())}, F64))
    # embedding
    table = rng.standard_normal((V, C))
    ids = rng.integers(0, V, (B, T))
    tt = _t(table)
    out_t = F.embedding(torch.tensor(ids), tt)
    dy = rng.standard_normal(tuple(out_t.shape))
    (out_t * torch.tensor(dy)).sum().backward()
    out, cache = ops.embedding.embedding_forward(ids, table)
    dtab = ops.embedding.embedding_backward(dy, cache)
    dtab = dtab[0] if isinstance(dtab, tuple) else dtab
    rows.append(_row("ops.embedding", "PyTorch autograd", {"out": (out, out_t.detach().numpy()),
                                                          "dtable": (dtab, tt.grad.numpy())}, F64))
    return rows


# ------------------------------------------------------------------------------------------------
# Adapter layers against PEFT (float64)
# ------------------------------------------------------------------------------------------------
def _peft_layer(config_kwargs: dict, d_in: int, d_out: int, seed: int, kind: str = "lora"):
    torch = _peer("torch")
    peft = _peer("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l0 = torch.nn.Linear(d_in, d_out)

    torch.manual_seed(seed)
    net = Net().double()
    cfg_cls = peft.AdaLoraConfig if kind == "adalora" else peft.LoraConfig
    pm = peft.get_peft_model(net, cfg_cls(target_modules=["l0"], **config_kwargs)).double()
    pm.train()
    return pm, pm.base_model.model.l0


def _layer_parity(name: str, peer: str, engine_layer, torch_layer, key_map: dict, rng, N: int = 7,
                  extra_loss=None) -> Row:
    """y, dX and every parameter gradient of engine_layer vs torch_layer on the same random x, dY.
    key_map: engine param key -> torch Parameter (already copied into the engine layer)."""
    torch = _peer("torch")
    d_in = torch_layer.base_layer.in_features if hasattr(torch_layer, "base_layer") else torch_layer.in_features
    x = rng.standard_normal((N, d_in))
    xt = torch.tensor(x, requires_grad=True)
    yt = torch_layer(xt)
    dy = rng.standard_normal(tuple(yt.shape))
    (yt * torch.tensor(dy)).sum().backward()
    engine_layer.zero_grad()
    y = engine_layer.forward(x)
    dx = engine_layer.backward(dy)
    pairs = {"y": (y, yt.detach().numpy()), "dX": (dx, xt.grad.numpy())}
    for key, p in key_map.items():
        pairs[f"d{key}"] = (engine_layer.grads[key], p.grad.detach().numpy())
    return _row(name, peer, pairs, F64)


def check_lora(rng) -> list[Row]:
    _peer("peft")
    rows = []
    for label, extra in (("LoRA layer", {}), ("rsLoRA layer", {"use_rslora": True}), ("DoRA layer", {"use_dora": True})):
        d_in, d_out, r = 6, 5, 3
        pm, tl = _peft_layer(dict(r=r, lora_alpha=6, init_lora_weights=False, **extra), d_in, d_out, seed=3)
        W = tl.base_layer.weight.detach().numpy().copy()
        b = tl.base_layer.bias.detach().numpy().copy()
        cfg = LoraConfig(r=r, lora_alpha=6, target_modules=["l0"], **extra)
        layer = resolve(cfg).make_layer("l0", Linear(W, b), np.random.default_rng(0))
        kmap = {"lora_A.weight": tl.lora_A["default"].weight, "lora_B.weight": tl.lora_B["default"].weight}
        if extra.get("use_dora"):
            kmap["lora_magnitude_vector"] = tl.lora_magnitude_vector["default"].weight
        for k, p in kmap.items():
            layer.params[k][...] = p.detach().numpy().reshape(layer.params[k].shape)
        rows.append(_layer_parity(label, "PEFT", layer, tl, kmap, rng))
    return rows


def check_adalora(rng) -> list[Row]:
    _peer("peft")
    torch = _peer("torch")
    d_in, d_out, r = 6, 5, 4
    pm, tl = _peft_layer(dict(init_r=r, target_r=2, total_step=10, lora_alpha=8), d_in, d_out, seed=4, kind="adalora")
    with torch.no_grad():
        tl.lora_E["default"].copy_(torch.tensor(rng.standard_normal((r, 1))))
    W = tl.base_layer.weight.detach().numpy().copy()
    b = tl.base_layer.bias.detach().numpy().copy()
    layer = AdaLoraLinear(Linear(W, b), r=r, lora_alpha=8, ranknum=r, rng=np.random.default_rng(0))
    kmap = {k: tl.__getattr__(k)["default"] for k in ("lora_A", "lora_E", "lora_B")}
    for k, p in kmap.items():
        layer.params[k][...] = p.detach().numpy()
    rows = [_layer_parity("AdaLoRA layer (SVD triplets)", "PEFT", layer, tl, kmap, rng)]
    # the orthogonal regulariser: PEFT's AdaLoraModel.forward adds it to the loss
    for p in kmap.values():
        p.grad = None
    A, B = kmap["lora_A"], kmap["lora_B"]
    eye_a, eye_b = torch.eye(r, dtype=A.dtype), torch.eye(r, dtype=B.dtype)
    reg_t = 0.5 * (torch.norm(A @ A.T - eye_a, p="fro") + torch.norm(B.T @ B - eye_b, p="fro")) / 2
    reg_t.backward()
    layer.zero_grad()
    reg = orth_regularizer([layer], 0.5, "peft")
    rows.append(_row("AdaLoRA orthogonal regulariser", "PEFT formula (torch)",
                     {"R": (np.float64(reg), reg_t.item()), "dA": (layer.grads["lora_A"], A.grad.numpy()),
                      "dB": (layer.grads["lora_B"], B.grad.numpy())}, F64))
    return rows


def check_rosa(rng) -> list[Row]:
    for name in ("peft_rosa", "spops"):
        try:
            importlib.import_module(name)
            break
        except ImportError:
            continue
    else:
        raise Missing("peft-rosa (IST-DASLab) is not installed; tests/ check RoSA against dense masked products")
    raise Missing("validate has no peft-rosa comparison; tests/test_rosa.py checks RoSA against dense masked products")


# ------------------------------------------------------------------------------------------------
# Whole models against transformers (float64)
# ------------------------------------------------------------------------------------------------
def check_gpt2(rng) -> list[Row]:
    torch = _peer("torch")
    transformers = _peer("transformers")
    cfg = transformers.GPT2Config(vocab_size=37, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(5)
    ref = transformers.GPT2LMHeadModel(cfg).double()
    ref.eval()
    ids = rng.integers(0, 37, (2, 9))
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d, safe_serialization=True)
        model = load_pretrained(d, get_backend("cpu", "float64"))
    # transformers' causal-LM loss casts logits to float32; the float64 loss is written out here
    # with the same shift (position t predicts token t+1).
    logits_t = ref(input_ids=torch.tensor(ids)).logits
    loss_t = torch.nn.functional.cross_entropy(logits_t[:, :-1].reshape(-1, cfg.vocab_size),
                                               torch.tensor(ids[:, 1:]).reshape(-1))
    loss_t.backward()
    model.train()  # dropout probabilities are 0: train mode only keeps the caches
    model.zero_grad()
    out = model.forward(ids, labels=ids)
    model.backward()
    pairs = {"logits": (out.logits, logits_t.detach().numpy()), "loss": (np.float64(out.loss), loss_t.item())}
    pairs.update(_grad_pairs(model, ref, conv1d=True))
    return [_row("GPT-2 LM (logits, loss, every gradient)", "transformers", pairs, F64)]


def check_bert(rng) -> list[Row]:
    torch = _peer("torch")
    transformers = _peer("transformers")
    cfg = transformers.BertConfig(vocab_size=41, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(6)
    ref = transformers.BertForSequenceClassification(cfg).double()
    ref.eval()
    ids = rng.integers(0, 41, (2, 7))
    mask = np.ones((2, 7), dtype=np.int64)
    mask[1, -3:] = 0
    labels = np.array([0, 2])
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d, safe_serialization=True)
        model = load_pretrained(d, get_backend("cpu", "float64"))
    out_t = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out_t.loss.backward()
    model.train()
    model.zero_grad()
    out = model.forward(ids, attention_mask=mask, labels=labels)
    model.backward()
    pairs = {"logits": (out.logits, out_t.logits.detach().numpy()), "loss": (np.float64(out.loss), out_t.loss.item())}
    pairs.update(_grad_pairs(model, ref, conv1d=False))
    return [_row("BERT classifier (logits, loss, every gradient)", "transformers", pairs, F64)]


def check_adapter_files(rng) -> list[Row]:
    """PEFT adapter files end to end: a transformers GPT-2 with a PEFT LoRA / AdaLoRA adapter saved
    by PEFT, run through `spectral-peft reference --adapter`, against the same files loaded back by
    PEFT (float64 loss written out; AdaLoRA's includes PEFT's orthogonal regulariser)."""
    torch = _peer("torch")
    transformers = _peer("transformers")
    peft = _peer("peft")
    rows = []
    targets = ["c_attn", "c_proj", "c_fc"]
    for label, make_cfg in (
            ("LoRA adapter file (GPT-2)", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                 fan_in_fan_out=True, init_lora_weights=False)),
            ("AdaLoRA adapter file (GPT-2)", lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                                       lora_alpha=8, target_modules=targets,
                                                                       fan_in_fan_out=True, orth_reg_weight=0.5))):
        cfg = transformers.GPT2Config(vocab_size=29, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        torch.manual_seed(7)
        with tempfile.TemporaryDirectory() as d:
            transformers.GPT2LMHeadModel(cfg).double().save_pretrained(f"{d}/model")
            pm = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(f"{d}/model"), make_cfg()).double()
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_E" in n:  # PEFT starts E at 0: make every gradient non-trivial
                        p.copy_(torch.tensor(rng.standard_normal(tuple(p.shape))))
            pm.save_pretrained(f"{d}/adapter")
            ids = rng.integers(0, 29, (2, 10))
            save_safetensors({"input_ids": ids, "labels": ids}, f"{d}/in.safetensors")
            code = cli.main(["reference", "--model", f"{d}/model", "--adapter", f"{d}/adapter",
                             "--inputs", f"{d}/in.safetensors", "--out", f"{d}/out.safetensors"])
            if code != 0:
                raise RuntimeError(f"spectral-peft reference exited with status {code}")
            ref = load_safetensors(f"{d}/out.safetensors")
            base = transformers.GPT2LMHeadModel.from_pretrained(f"{d}/model", dtype=torch.float64)
            tm = peft.PeftModel.from_pretrained(base, f"{d}/adapter", is_trainable=True).double().eval()
        logits = tm(input_ids=torch.tensor(ids)).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 29), torch.tensor(ids[:, 1:]).reshape(-1))
        if "AdaLoRA" in label:  # PEFT's AdaLoraModel.forward: weight · mean of ||P Pᵀ − I||_F over A and B
            regs = [torch.norm((p @ p.T if "lora_A" in n else p.T @ p) - torch.eye(p.shape[0] if "lora_A" in n
                                                                                    else p.shape[1], dtype=p.dtype))
                    for n, p in tm.named_parameters() if "lora_A" in n or "lora_B" in n]
            loss = loss + 0.5 * sum(regs) / len(regs)
        loss.backward()
        pairs = {"logits": (ref["logits"], logits.detach().numpy()), "loss": (ref["loss"], loss.item())}
        for n, p in tm.named_parameters():
            if p.requires_grad and ".lora_" in n:  # (AdaLoRA's ranknum is a constant, not an adapter weight)
                key = "grad." + n.replace(".default", "")
                if key not in ref:
                    raise RuntimeError(f"reference wrote no {key!r}")
                pairs[key] = (ref[key], p.grad.numpy())
        rows.append(_row(label, "PEFT + transformers", pairs, F64))
    return rows


CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _grad_pairs(model, ref, conv1d: bool) -> dict:
    """grad.<HF key> pairs: the engine's dotted names are the HF keys; GPT-2's Conv1D weights are
    stored (d_in, d_out) by transformers and (d_out, d_in) by the engine."""
    ref_params = dict(ref.named_parameters())
    pairs = {}
    for name, g in model.named_grads().items():
        if name not in ref_params:
            continue
        p = ref_params[name]
        if p.grad is None:
            continue
        e = p.grad.detach().numpy()
        a = np.asarray(g)
        if conv1d and name.endswith(CONV1D_SUFFIXES):
            a = a.T
        pairs[f"grad.{name}"] = (a, e)
    if not pairs:
        raise Missing("no engine gradient name matched a transformers parameter name")
    return pairs


# ------------------------------------------------------------------------------------------------
# 4-bit quantisation against bitsandbytes
# ------------------------------------------------------------------------------------------------
def check_bnb(rng) -> list[Row]:
    torch = _peer("torch")
    _peer("bitsandbytes")
    import bitsandbytes.functional as bf  # noqa: PLC0415

    rows = []
    W = (rng.standard_normal((48, 64)) * 0.05).astype(np.float32)
    for qt in ("nf4", "fp4"):
        for dq in (False, True):
            packed_t, state_t = bf.quantize_4bit(torch.tensor(W), blocksize=64, quant_type=qt, compress_statistics=dq)
            deq_t = bf.dequantize_4bit(packed_t, state_t).numpy()
            packed, state = quantize_4bit(W, quant_type=qt, blocksize=64, compress_statistics=dq)
            deq = np.asarray(dequantize_4bit(packed, state), dtype=np.float32).reshape(W.shape)
            codes_a = np.asarray(packed, dtype=np.uint8).reshape(-1)
            codes_e = packed_t.numpy().astype(np.uint8).reshape(-1)
            same = codes_a.shape == codes_e.shape and np.array_equal(codes_a, codes_e)
            deq, deq_t = deq.astype(np.float64), deq_t.astype(np.float64)
            ab = float(np.abs(deq - deq_t).max())
            err = scaled_error(deq, deq_t, float(np.abs(deq_t).max()))
            ok = same and ab == 0.0
            rows.append(Row(f"{qt.upper()} quantise{' + double quant' if dq else ''} (codes, dequant)",
                            "bitsandbytes", ab, err, "identical", "PASS" if ok else "FAIL",
                            "" if same else "packed codes differ"))
    return rows


# ------------------------------------------------------------------------------------------------
# Real pretrained weights: MiniLM against transformers (float32)
# ------------------------------------------------------------------------------------------------
def check_minilm(rng) -> list[Row]:
    torch = _peer("torch")
    transformers = _peer("transformers")
    _peer("tokenizers")
    folder = minilm.model_dir()  # FileNotFoundError (listed as missing) when the weights package is absent

    sentences = ["A reference engine checks other implementations.", "Low-rank adapters are small."]
    batch = minilm.tokenize(sentences, folder=folder)
    ref = transformers.BertModel.from_pretrained(str(folder), add_pooling_layer=False)
    ref.eval()
    with torch.no_grad():
        hs_t = ref(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]),
                   token_type_ids=torch.tensor(batch["token_type_ids"])).last_hidden_state.numpy()
    model = minilm.load_minilm(get_backend("cpu", "float32"), folder=folder)
    hs = minilm.hidden_states(model, batch)
    keep = batch["attention_mask"].astype(bool)
    return [_row("MiniLM-L6 hidden states (real weights)", "transformers",
                 {"last_hidden_state": (hs[keep], hs_t[keep])}, MINILM_RTOL, label=f"rtol {MINILM_RTOL:g} (fp32)")]


CHECKS = (
    ("ops", check_ops, "PyTorch autograd"),
    ("lora", check_lora, "PEFT"),
    ("adalora", check_adalora, "PEFT"),
    ("rosa", check_rosa, "peft-rosa"),
    ("gpt2", check_gpt2, "transformers"),
    ("bert", check_bert, "transformers"),
    ("adapters", check_adapter_files, "PEFT"),
    ("bnb", check_bnb, "bitsandbytes"),
    ("minilm", check_minilm, "transformers"),
)


def run_checks(names=None, seed: int = 0, log=print) -> tuple[list[Row], list[tuple[str, str, str]]]:
    """Run the checks named (all by default). Returns (rows, missing: (check, peer, reason))."""
    rows, missing = [], []
    for name, fn, peer in CHECKS:
        if names and name not in names:
            continue
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        try:
            got = fn(rng)
            rows.extend(got)
        except Missing as exc:
            missing.append((name, peer, str(exc)))
        except FileNotFoundError as exc:
            missing.append((name, peer, str(exc)))
        except Exception as exc:  # a check that crashes is a failure of that check, reported as one
            detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            rows.append(Row(name, peer, math.nan, math.nan, "-", "FAIL", f"error: {detail}"))
            if log is not None and "SPECTRAL_PEFT_DEBUG" in os.environ:
                traceback.print_exc()
        if log is not None:
            log(f"  {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return rows, missing


def format_rows(rows: list[Row]) -> str:
    head = ("component", "peer", "max abs error", "scaled error", "tolerance", "verdict")
    body = [(r.component, r.peer, f"{r.max_abs:.2e}", f"{r.scaled:.2e}", r.tolerance,
             r.verdict + (f" ({r.detail})" if r.detail else "")) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def add_arguments(parser) -> None:
    names = [n for n, _, _ in CHECKS]
    parser.add_argument("--only", metavar="NAMES", default=None,
                        help=help_text(f"comma list of checks to run: {', '.join(names)}", "all"))
    parser.add_argument("--seed", type=int, default=0, help=help_text("seed of the random cases", 0))


def main(args) -> int:
    known = [n for n, _, _ in CHECKS]
    names = None
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        bad = [n for n in names if n not in known]
        if bad or not names:
            print(f"spectral-peft validate: error: --only {args.only!r}: unknown check(s) {bad or 'none given'}; "
                  f"choose from {', '.join(known)}", file=sys.stderr)
            return 2
    rows, missing = run_checks(names, seed=args.seed, log=lambda *a, **k: None)
    print(format_rows(rows))
    if missing:
        print("\nnot checked (missing):")
        for name, peer, reason in missing:
            print(f"  {name} [{peer}]: {reason}")
    failed = [r for r in rows if r.verdict != "PASS"]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed, {len(missing)} not checked", flush=True)
    if not rows:
        peers = ", ".join(sorted({peer for _, peer, _ in missing})) or "none"
        print(f"spectral-peft validate: error: nothing was checked: every chosen check's peer is missing "
              f"({peers}); install it, or choose other checks with --only", file=sys.stderr)
        return 2
    return 1 if failed else 0
