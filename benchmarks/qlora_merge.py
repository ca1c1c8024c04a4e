"""Merging a LoRA into a 4-bit base, three ways, measured (spectral_peft/quant/merge.py, docs/qlora.md).

The model: a small Llama (4 layers, width 128, 4 query / 2 key-value heads, byte vocabulary)
pretrained by the engine for --pretrain_steps on the standard library's source, quantised to NF4
with double quantisation (QLoRA's base), then fine-tuned with LoRA (r 8, alpha 16, every
projection) for --finetune_steps at --finetune_lr (QLoRA's 2e-4) on the library's docstrings,
float64 throughout. The adapter is
then merged three ways: requantised into a new 4-bit base (PEFT's merge into a bitsandbytes
Linear4bit), merged into a float copy of the base, and kept unmerged (the exact model).

Measured, each against the unmerged model:
- weights: per merged layer the error against W* = W_q + s·B A (max abs; Frobenius relative to
  ||s·B A||, so 1.0 means an error as large as the whole delta), the share of the delta that
  survived (<W' − W_q, Δ>/||Δ||²), the fraction of elements whose 4-bit code did not move, and the
  fraction where |Δ| is below half a quantisation step (where requantisation cannot keep it);
- logits on --eval_batches held-out batches: max abs and relative error, and the eval loss;
- greedy generation of 64 tokens from 4 prompts: the first step at which any merged model's token
  differs, and the KL(unmerged || merged) of the next-token distributions per step, teacher-forced
  on the unmerged model's own sequence.

Writes figures/qlora_merge.png (the per-step KL, and where the delta falls against the half-steps)
and ends with ONE JSON line: requant_weight_rel_err, float_merge_weight_rel_err,
first_divergent_token (requantised; null when none in 64), and the rest.

Run: python benchmarks/qlora_merge.py [--pretrain_steps N] [--finetune_steps N] [--out PNG]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np

from spectral_peft.adapters.lora import LoraConfig
from spectral_peft.adapters.peft_model import get_peft_model
from spectral_peft.backend import get_backend
from spectral_peft.data import eval_batches, finetune_corpora, pretrain_corpus
from spectral_peft.generation import generate, position_ids_from_mask
from spectral_peft.model import LlamaConfig, LlamaForCausalLM
from spectral_peft.optim import make_adamw
from spectral_peft.plots.common import pyplot
from spectral_peft.quant import quantize_model
from spectral_peft.quant.merge import half_steps, merge_error, merge_float, merge_lora_4bit, merge_requantize
from spectral_peft.train import SeededBatches, Trainer, evaluate

T, BATCH, NEW = 64, 8, 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_per_step(p_logits, q_logits):
    """KL(p || q) per (row, step): (B, n, V) logits -> (B, n)."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def teacher_forced_logits(model, sequences, prompt_len):
    """The next-token logits of ``model`` at every generated step of ``sequences`` (B, P+n), one
    full forward: (B, n, V)."""
    mask = np.ones(sequences.shape, dtype=bool)
    out = model.forward(sequences[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids_from_mask(mask[:, :-1]))
    return np.asarray(out.logits)[:, prompt_len - 1:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain_steps", type=int, default=300)
    ap.add_argument("--finetune_steps", type=int, default=150)
    ap.add_argument("--finetune_lr", type=float, default=2e-4, help="LoRA's learning rate (QLoRA's paper: 2e-4)")
    ap.add_argument("--eval_batches", type=int, default=4)
    ap.add_argument("--out", default=os.path.join("figures", "qlora_merge.png"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    be = get_backend("cpu", "float64")
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T + NEW,
                      tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = LlamaForCausalLM(cfg, be, seed=0)
    pre = pretrain_corpus(400_000)
    Trainer(model, *make_adamw(model, 3e-3, 0.0, args.pretrain_steps), max_grad_norm=1.0).fit(
        SeededBatches(pre.tokens, BATCH, T, seed=1), args.pretrain_steps)
    quantize_model(model, quant_type="nf4", blocksize=64, compress_statistics=True)
    train, held = finetune_corpora(200_000)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS), seed=2)
    Trainer(pm, *make_adamw(pm, args.finetune_lr, 0.0, args.finetune_steps), max_grad_norm=1.0).fit(
        SeededBatches(train.tokens, BATCH, T, seed=3), args.finetune_steps)
    pm.eval()
    windows = eval_batches(held.tokens, BATCH, T, args.eval_batches)  # [(B, T)]
    batches = [{"input_ids": w, "labels": w} for w in windows]
    prompts = np.stack([w[0, :16] for w in windows])  # (P, 16): one prompt per eval batch

    # weights, per layer, before anything is merged (the merges replace the layers)
    layers = pm.adapter_layers()
    per_layer = [(merge_error(l, merge_requantize(l)), merge_error(l, merge_float(l))) for _, l in layers]
    ratios = np.concatenate([np.abs(np.asarray(l.delta_weight())).reshape(-1) / half_steps(l.base_layer)
                             for _, l in layers])
    reference = {"logits": [np.asarray(pm.forward(w).logits) for w in windows], "loss": evaluate(pm, batches),
                 "gen": generate(pm, prompts, max_new_tokens=NEW)}
    results = {}
    for how in ("requantize", "float"):
        merged = merge_lora_4bit(copy.deepcopy(pm), how)  # merging replaces layers: merge a copy
        merged.eval()
        logits = [np.asarray(merged.forward(w).logits) for w in windows]
        err = max(float(np.max(np.abs(a - e))) for a, e in zip(logits, reference["logits"]))
        scale = max(float(np.max(np.abs(e))) for e in reference["logits"])
        gen = generate(merged, prompts, max_new_tokens=NEW)
        differs = np.flatnonzero((gen.sequences != reference["gen"].sequences).any(axis=0))
        kl = kl_per_step(teacher_forced_logits(pm, reference["gen"].sequences, prompts.shape[1]),
                         teacher_forced_logits(merged, reference["gen"].sequences, prompts.shape[1]))
        i = 0 if how == "requantize" else 1
        results[how] = {
            "weight_rel_err_median": float(np.median([p[i]["rel_fro"] for p in per_layer])),
            "weight_max_abs": float(max(p[i]["max_abs"] for p in per_layer)),
            "delta_kept_median": float(np.median([p[i]["delta_kept"] for p in per_layer])),
            "logit_max_abs_err": err, "logit_rel_err": err / scale,
            "eval_loss": evaluate(merged, batches), "eval_loss_unmerged": reference["loss"],
            "first_divergent_token": int(differs[0] - prompts.shape[1]) if differs.size else None,
            "kl_per_step_mean": kl.mean(axis=0).tolist(), "kl_mean": float(kl.mean()),
        }
        if how == "requantize":
            results[how]["codes_unchanged_median"] = float(np.median([p[0]["codes_unchanged"] for p in per_layer]))
            results[how]["below_half_step_median"] = float(np.median([p[0]["below_half_step"] for p in per_layer]))

    _figure(args.out, results, ratios)
    rq, fl = results["requantize"], results["float"]
    for how, r in results.items():
        print(f"{how:10s}: weight error {r['weight_rel_err_median']:.3f} of ||ΔW|| (median over layers), delta kept "
              f"{r['delta_kept_median']:.3f}, logits rel err {r['logit_rel_err']:.2e}, eval loss {r['eval_loss']:.4f} "
              f"(unmerged {r['eval_loss_unmerged']:.4f}), first divergent token {r['first_divergent_token']}, "
              f"mean KL {r['kl_mean']:.2e}")
    print(f"|ΔW| below half a quantisation step: {100 * float(np.mean(ratios < 1)):.1f}% of elements "
          f"(median |ΔW|/half-step {float(np.median(ratios)):.3f}); codes unchanged by requantisation "
          f"{100 * rq['codes_unchanged_median']:.1f}%; figure {args.out}")
    summary = {"bench": "qlora_merge", "requant_weight_rel_err": rq["weight_rel_err_median"],
               "float_merge_weight_rel_err": fl["weight_rel_err_median"],
               "first_divergent_token": rq["first_divergent_token"],
               "float_first_divergent_token": fl["first_divergent_token"],
               "requant_delta_kept": rq["delta_kept_median"], "requant_codes_unchanged": rq["codes_unchanged_median"],
               "below_half_step": float(np.mean(ratios < 1)), "requant_logit_rel_err": rq["logit_rel_err"],
               "float_logit_rel_err": fl["logit_rel_err"], "requant_kl_mean": rq["kl_mean"],
               "float_kl_mean": fl["kl_mean"], "eval_loss_unmerged": rq["eval_loss_unmerged"],
               "eval_loss_requant": rq["eval_loss"], "eval_loss_float": fl["eval_loss"],
               "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(summary))
    return 0


def _figure(path, results, ratios):
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for how, r in results.items():
        a.semilogy(np.maximum(r["kl_per_step_mean"], 1e-18), label=f"{how} merge")
    a.set_xlabel("generated token")
    a.set_ylabel("KL(unmerged || merged), mean over prompts")
    a.set_title("next-token distributions, teacher-forced")
    a.legend()
    b.hist(np.log10(np.maximum(ratios, 1e-6)), bins=60, color="C2")
    b.axvline(0.0, color="k", linestyle="--", label="half a quantisation step")
    b.set_xlabel("log10 |ΔW| / (half the gap to the neighbouring code)")
    b.set_ylabel("elements")
    b.set_title(f"{100 * float(np.mean(ratios < 1)):.0f}% of the delta is below half a step")
    b.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
