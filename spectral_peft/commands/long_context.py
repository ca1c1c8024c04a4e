"""`spectral-peft run --longlora_context F`: LongLoRA's context extension, measured.

After the run's methods, from the same cached base (pretrained at T0 = --n_positions):

1. the base's context is extended F times (adapters/longlora.py extend_context: GPT-2's position
   table linearly interpolated to F·T0 rows; a RoPE base by linear position interpolation, factor F);
2. "extended base": that model evaluated as it is, without fine-tuning (without LongLoRA);
3. "LongLoRA": the extended model fine-tuned at T = F·T0 for --steps steps (S2-Attn with G = T/4,
   LoRA at --r on the attention projections, the norms (and GPT-2's position table) trained through
   modules_to_save);
4. "LoRA, full attention": the same fine-tuning with S2-Attn switched off (the ablation).

Each is evaluated on the held-out docstrings at 1x, 2x and 4x T0 (the lengths <= F·T0), always
with full attention. The record goes to results["long_context"] and the figure
long_context.png (plots/longlora.py).
"""
from __future__ import annotations

import time

from .. import data as data_mod
from ..adapters.longlora import (
    ATTENTION_TARGETS,
    MODULES_TO_SAVE,
    LongLoraConfig,
    extend_context,
)
from ..adapters.peft_model import get_peft_model
from ..optim import make_adamw
from ..train import SeededBatches, Trainer, evaluate
from .pretrain import load_base

MULTIPLES = (1, 2, 4)  # eval lengths, in units of T0


def eval_sets(tokens, cfg, length: int) -> list:
    """Held-out windows of ``length`` bytes: --eval_batches batches of --batch_size, at least one
    window (fewer batches when the held-out text is short)."""
    windows = data_mod.eval_batches(tokens, cfg.batch_size, length, cfg.eval_batches)
    return [{"input_ids": w, "labels": w} for w in windows]


def long_context_phase(cfg, ctx: dict, results: dict, log) -> None:
    F, T0 = cfg.longlora_context, cfg.n_positions
    T = F * T0
    t0 = time.perf_counter()
    lengths = [m * T0 for m in MULTIPLES if m * T0 <= T]
    sets = {L: eval_sets(ctx["eval_tokens"], cfg, L) for L in lengths}
    saved, extra = list(MODULES_TO_SAVE), 0
    if cfg.arch == "gpt2":  # the interpolated position table is trained too (the paper's embeddings)
        saved, extra = ["wpe", *saved], T * cfg.n_embd
    conf = LongLoraConfig.for_run(cfg, cfg.r, target_modules=ATTENTION_TARGETS, modules_to_save=saved,
                                  extra_numel=extra)
    record = {"factor": F, "T0": T0, "T_train": T, "group_size": conf.group_size(T), "lengths": lengths,
              "windows": {str(L): int(sum(b["input_ids"].shape[0] for b in s)) for L, s in sets.items()},
              "eval_loss": {}, "trainable_params": {}}
    base = load_base(ctx["base_folder"], ctx["backend"])
    record["eval_loss"]["base (T0 positions)"] = {str(T0): evaluate(base, sets[T0])}
    extended = extend_context(load_base(ctx["base_folder"], ctx["backend"]), F)
    record["eval_loss"]["extended base, no fine-tuning"] = {str(L): evaluate(extended, s) for L, s in sets.items()}
    for name, s2 in (("LongLoRA (S2-Attn)", True), ("LoRA + modules_to_save, full attention", False)):
        pm = get_peft_model(extend_context(load_base(ctx["base_folder"], ctx["backend"]), F), conf, seed=cfg.seed)
        if not s2:
            for _, m in pm.named_modules():
                if hasattr(m, "shift_group"):
                    m.shift_group = None
        pm.train()
        opt, sched = make_adamw(pm, cfg.lr, cfg.weight_decay, cfg.steps)
        trainer = Trainer(pm, opt, sched, max_grad_norm=cfg.max_grad_norm, progress=cfg.progress,
                          progress_desc="longlora" if s2 else "lora-full")
        batches = SeededBatches(ctx["train_tokens"], cfg.batch_size, T, seed=cfg.seed + 2)
        trainer.fit(batches, cfg.steps)
        record["eval_loss"][name] = {str(L): evaluate(pm, s) for L, s in sets.items()}
        record["trainable_params"][name] = pm.trainable_parameter_count()
        ms = [h["ms"] for h in trainer.history if not h["skipped"]]
        record.setdefault("ms_per_step", {})[name] = round(sorted(ms)[len(ms) // 2], 2) if ms else None
    record["seconds"] = round(time.perf_counter() - t0, 2)
    results["long_context"] = record
    log(f"long context: extended {F}x (T0 {T0} -> {T}), LongLoRA G = {record['group_size']}, "
        f"{cfg.steps} steps; eval loss at {', '.join(f'{L // T0}x' for L in lengths)}:")
    for name, losses in record["eval_loss"].items():
        log(f"  {name:<40} " + "  ".join(f"{L // T0}x {losses[str(L)]:.4f}" if str(L) in losses else f"{L // T0}x    -  "
                                       for L in lengths))
