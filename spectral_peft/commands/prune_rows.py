"""The main job's pruned-base rows: `spectral-peft run --prune S[,S...] --prune_method M`
(spectral_peft/prune has the masks and layers; docs/pruning.md).

For each sparsity s (or the one of an N:M pattern), the cached dense base is pruned on every
target linear (--target_modules); Wanda's activation norms come from a few training batches
(:data:`CALIBRATION_BATCHES`, a seed of their own) through the dense base. Then:

- "without the adapter": the pruned base's eval loss, before any fine-tuning;
- "with the adapter": LoRA (and QLoRA when the run has it: prune, then quantise) trained on the
  pruned base exactly as its dense row (same budget, batches, steps), named ``lora+wanda50``.

The rows join ``results["methods"]``; ``results["pruning"]`` holds the curve the figure
``pruning.png`` draws (eval loss against sparsity, with and without the adapter).
"""
from __future__ import annotations

import time

from ..adapters.registry import recipe as get_recipe
from ..budget import BudgetUnreachable, match_budget
from ..prune.layers import activation_norms, prune_model
from ..prune.masks import method_tag, parse_prune_method, parse_sparsities
from ..train import SeededBatches, evaluate
from .method import build_method, train_method
from .pretrain import load_base

CALIBRATION_BATCHES = 4  # Wanda's 128 sequences of 2048 tokens, scaled to the run: 4 batches of B × T
PRUNED_METHODS = ("lora", "qlora")  # the adapters trained on a pruned base (when the run names them)


def calibration_batches(cfg, train_tokens) -> list[dict]:
    batches = SeededBatches(train_tokens, cfg.batch_size, cfg.n_positions, seed=cfg.seed + 7)
    return [batches.batch(t) for t in range(CALIBRATION_BATCHES)]


def pruned_rows(cfg, ctx: dict, results: dict, log) -> None:
    """Add the pruned-base rows and ``results["pruning"]`` (module docstring)."""
    score, nm = parse_prune_method(cfg.prune_method)
    sparsities = parse_sparsities(cfg.prune) if nm is None else [1 - nm[0] / nm[1]]
    targets = cfg.target_list()
    dense = load_base(ctx["base_folder"], ctx["backend"])
    norms = activation_norms(dense, calibration_batches(cfg, ctx["train_tokens"]), targets) if score == "wanda" else None
    names = [n for n in PRUNED_METHODS if n in cfg.method_list()] or ["lora"]
    record = {"score": score, "nm": list(nm) if nm else None, "calibration_batches": CALIBRATION_BATCHES,
              "targets": targets, "dense": {"base_eval_loss": results["base_model"].get("eval_loss")}, "points": []}
    for name in names:
        row = next((m for m in results["methods"] if m["method"] == name), None)
        if row is not None:
            record["dense"][name] = {"eval_loss": row["final_eval_loss"], "frozen_weight_bytes": row["frozen_weight_bytes"],
                                     "ms_per_step": row["ms_per_step"]}

    def prune(model):
        return prune_model(model, score, s, nm, norms, targets)

    for s in sparsities:
        tag = method_tag(score, s, nm)
        base = load_base(ctx["base_folder"], ctx["backend"])
        try:
            layers = prune(base)
        except ValueError as exc:  # e.g. an N:M pattern that a target's d_in does not divide
            for name in names:
                results["unavailable"].append({"method": f"{name}+{tag}", "reason": f"pruning the base: {exc}"})
            log(f"pruned base {tag}: not run: {exc}")
            continue
        point = {"sparsity": s, "tag": tag, "base_eval_loss": evaluate(base, ctx["eval_sets"]),
                 "zeros": int(sum(r["zeros"] for r in layers.values())),
                 "size": int(sum(r["size"] for r in layers.values())),
                 "weight_bytes": int(sum(r["weight_bytes"] for r in layers.values())),
                 "dense_bytes": int(sum(r["dense_bytes"] for r in layers.values())), "adapted": {}}
        log(f"pruned base {tag}: {point['zeros']:,} of {point['size']:,} target weights zero; stored "
            f"{point['weight_bytes']:,} bytes (dense {point['dense_bytes']:,}); eval loss {point['base_eval_loss']:.4f}")
        for name in names:
            recipe, t0 = get_recipe(name), time.perf_counter()
            try:
                size, _ = match_budget(recipe, cfg, ctx["shapes"], results["budget"]["target"], cfg.tolerance)
            except BudgetUnreachable as exc:
                results["unavailable"].append({"method": f"{name}+{tag}", "reason": str(exc)})
                continue
            model, conf = build_method(recipe, cfg, ctx["base_folder"], ctx["backend"], size, prune=prune)
            row_name = f"{name}+{tag}"
            rec = train_method(recipe, model, cfg, ctx["train_tokens"], ctx["eval_sets"], folder=ctx.get("folder"),
                               row=row_name)
            settings = {**conf.to_json_dict(model), "base_pruning": {"method": tag, "score": score, "sparsity": s,
                                                                     "nm": list(nm) if nm else None}}
            results["methods"].append({"method": row_name, "settings": settings, **rec})
            results["timing"]["methods_s"][row_name] = round(time.perf_counter() - t0, 2)
            point["adapted"][name] = rec["final_eval_loss"]
            log(f"method {row_name:>14}: trainable {rec['trainable_params']:>9,}  eval loss "
                f"{rec['final_eval_loss']:.4f}  {rec['ms_per_step']:.1f} ms/step  frozen bytes "
                f"{rec['frozen_weight_bytes']:,}")
        record["points"].append(point)
    results["pruning"] = record


__all__ = ["CALIBRATION_BATCHES", "PRUNED_METHODS", "pruned_rows"]
