"""One method of the main job: build it on a fresh copy of the cached base, and train it.

Shared by the run's own rows (commands/run.py) and the pruned-base rows (commands/prune_rows.py).
"""
from __future__ import annotations

import os

import numpy as np

from .. import distributed
from ..adapters.peft_model import PeftModel, get_peft_model
from ..monitor import METRICS_FILE, MetricsLog
from ..optim import make_adamw
from ..quant import frozen_weight_bytes, quantize_model
from ..train import SeededBatches, Trainer
from .pretrain import load_base
from .run_options import RunConfig


def build_method(recipe, cfg: RunConfig, base_folder: str, backend, size, prune=None):
    """A fresh base loaded from the cache, pruned by ``prune(model)`` when given (spectral_peft.prune),
    quantised when the recipe asks, with the recipe's adapters at ``size``: (model, adapter config or
    None for full fine-tuning)."""
    model = load_base(base_folder, backend)
    if prune is not None:
        prune(model)
    if recipe.quantized:  # in place: every dense Linear -> Linear4bit
        quantize_model(model, quant_type=cfg.quant_type, blocksize=cfg.blocksize,
                       compress_statistics=cfg.compress_statistics)
    conf = recipe.make_config(cfg, size)
    if conf is None:
        model.train()
        return model, None
    peft = get_peft_model(model, conf, seed=cfg.seed)
    peft.train()
    return peft, peft.peft_config


def trainable_count(model) -> int:
    """Trainable parameters: a PeftModel's count (RoSA's sparse values at their final nnz), else
    every trainable parameter of the plain model."""
    return model.trainable_parameter_count() if isinstance(model, PeftModel) else model.num_parameters(trainable_only=True)


def _median_ms(times_ms: list[float]) -> float:
    tail = times_ms[2:] if len(times_ms) > 4 else times_ms  # the first steps pay one-time costs
    return float(np.median(tail)) if tail else 0.0


def metrics_log(cfg: RunConfig, folder: str | None, row: str, model, optimizer) -> MetricsLog | None:
    """The per-step log of one row of the run: lines appended to ``<folder>/metrics.jsonl`` with
    ``"method": row`` (and TensorBoard event files in ``<--tensorboard>/<row>``); None without a folder."""
    if folder is None:
        return None
    tensorboard = None if cfg.tensorboard is None else os.path.join(cfg.tensorboard, row)
    return MetricsLog(os.path.join(folder, METRICS_FILE), model, optimizer, comm=distributed.world(),
                      tensorboard_dir=tensorboard, fields={"method": row})


def train_method(recipe, model, cfg: RunConfig, train_tokens, eval_sets: list, window: int | None = None,
                 folder: str | None = None, row: str | None = None) -> dict:
    """Fine-tune ``model`` for cfg.steps steps with the engine's Trainer (PEFT's call order),
    evaluating every cfg.eval_every steps; returns the measured record (MethodResult fields).
    ``window``: the training windows' length, cfg.n_positions unless given (prefix / prompt tuning).
    ``folder``: the run folder, whose metrics.jsonl receives every step's metrics under the method
    name ``row`` (default: the recipe's name)."""
    opt, sched = make_adamw(model, getattr(cfg, recipe.lr_option), cfg.weight_decay, cfg.steps)
    trainer = Trainer(model, opt, sched, max_grad_norm=cfg.max_grad_norm, progress=cfg.progress,
                      progress_desc=f"{recipe.name:>9}",
                      metrics_log=metrics_log(cfg, folder, row or recipe.name, model, opt))
    batches = SeededBatches(train_tokens, cfg.batch_size, window or cfg.n_positions, seed=cfg.seed + 2)  # same for all
    steps = trainer.fit(batches, cfg.steps, eval_batches=eval_sets, eval_every=cfg.eval_every)
    extras = model.report(lambda: trainer.evaluate(eval_sets)) if isinstance(model, PeftModel) else {}
    if not extras.get("singular_values"):
        extras.pop("singular_values", None)
    times = [h["ms"] for h in trainer.history if not h["skipped"]]
    comm = trainer.comm
    by_rank = comm.allgather(round(_median_ms(times), 3))  # every rank's median step, for results.json
    ms_comm = round(_median_ms([h["ms_comm"] for h in trainer.history if not h["skipped"]]), 3)
    return {
        "trainable_params": trainable_count(model),
        "frozen_weight_bytes": frozen_weight_bytes(model),
        "peak_activation_bytes": int(max((h["activation_bytes"] for h in trainer.history), default=0)),
        "ms_per_step": round(_median_ms(times), 3),
        "final_eval_loss": float(trainer.eval_history[-1][1]),
        "train_curve": {"step": [m["step"] for m in steps], "loss": [round(float(m["loss"]), 5) for m in steps],
                        # device-to-host syncs and host-to-device copies of each step (backend accounting)
                        "d2h": [m["d2h"] for m in steps], "h2d": [m["h2d"] for m in steps]},
        "eval_curve": {"step": [s for s, _ in trainer.eval_history], "loss": [float(v) for _, v in trainer.eval_history]},
        "extras": extras,
        "world_size": comm.size,
        # [median ms/step of rank r] and the median all-reduce ms per step (0.0 on one process)
        "timing": {"ms_per_step_by_rank": by_rank, "ms_comm_per_step": ms_comm},
    }
