"""A small, fully seeded training run, shared by the resume tests and run by them as a subprocess.

As a script it trains (resuming from the newest checkpoint in --dir when one exists) and prints
one line per step, ``step <n> <loss as float.hex()>``, flushed, so the test can kill it at any
point with SIGKILL. ``--pause STEP:FILE`` makes the checkpoint writer stop, after writing FILE
into the temporary directory of step STEP's checkpoint, print ``PAUSED`` and sleep: the test
kills it there, in the middle of a checkpoint write.

The run: a tiny GPT-2 (2 layers, d 32, T 16, dropout 0.1 everywhere), AdamW with a linear
warm-up/decay schedule and gradient clipping, SeededBatches of random tokens, and one of the
methods (full fine-tuning, LoRA, DoRA, LoRA-FA, Delta-LoRA, QLoRA, DyLoRA, AdaLoRA, RoSA) configured so that the kill points
fall inside AdaLoRA's pruning schedule and RoSA's gradient collection.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from spectral_peft.backend import get_backend
from spectral_peft.model import GPT2Config, GPT2LMHeadModel
from spectral_peft.optim import AdamW, LinearWarmupLinearDecay
from spectral_peft.train import SeededBatches, Trainer

V, C, T, B = 64, 32, 16, 2  # vocabulary, width, sequence, batch
TOTAL = 12  # the schedule length every method is configured for


def make_model(backend, seed):
    """The tiny GPT-2 (2 layers, d 32, 2 heads, T 16, every dropout 0.1) and the linears adapted."""
    cfg = GPT2Config(vocab_size=V, n_positions=T, n_embd=C, n_layer=2, n_head=2,
                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return GPT2LMHeadModel(cfg, backend, seed=seed), ["c_attn", "c_fc"]


def make_optimizer(model):
    opt = AdamW(model, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    return opt, LinearWarmupLinearDecay(opt, num_warmup_steps=2, num_training_steps=TOTAL)


def tokens(seed=0):
    return np.random.default_rng(12345 + seed).integers(0, V, size=400)


def build(method="full", dtype="float64", seed=0, checkpoint_dir=None, every=None, **trainer_kwargs):
    """(trainer, batches) of a fresh, fully seeded run of ``method``."""
    backend = get_backend("cpu", dtype)
    model, targets = make_model(backend, seed)
    if method == "full":
        pm = model
    else:
        from spectral_peft.adapters.peft_model import get_peft_model  # noqa: PLC0415
        if method == "adalora":  # mid-schedule at the kill points: tinit 2, masking every step, tfinal 3
            from spectral_peft.adapters.adalora import AdaLoraConfig  # noqa: PLC0415
            cfg = AdaLoraConfig(target_modules=targets, init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=1,
                                total_step=TOTAL, lora_dropout=0.1, lora_alpha=8)
        elif method == "rosa":  # 2 warm-up steps, then 3 collection steps, then sparse training
            from spectral_peft.adapters.rosa import RosaConfig  # noqa: PLC0415
            cfg = RosaConfig(r=2, d=0.05, target_modules=targets, schedule="wl2", spa_num_grads=3,
                             lora_dropout=0.1, init_lora_weights="gaussian")
        elif method in ("lora", "qlora"):
            from spectral_peft.adapters.lora import LoraConfig  # noqa: PLC0415
            if method == "qlora":  # NF4 base with double quantisation, as in QLoRA
                from spectral_peft.quant import quantize_model  # noqa: PLC0415
                quantize_model(model, "nf4", 64, compress_statistics=True, target_modules=targets)
            cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets, init_lora_weights="gaussian")
        elif method == "dora":
            from spectral_peft.adapters.lora import LoraConfig  # noqa: PLC0415
            cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets, use_dora=True,
                             init_lora_weights="gaussian")
        elif method == "lorafa":
            from spectral_peft.adapters.lorafa import LoraFAConfig  # noqa: PLC0415
            cfg = LoraFAConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets, corrected_grad=True,
                               init_lora_weights="gaussian")
        elif method == "deltalora":  # the frozen base W moves after step 3: the checkpoint must carry it
            from spectral_peft.adapters.deltalora import DeltaLoraConfig  # noqa: PLC0415
            cfg = DeltaLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, delta_start_step=3,
                                  init_lora_weights="gaussian")
        elif method == "dylora":  # the rank stream: b ~ U{1..r_max} each step
            from spectral_peft.adapters.dylora import DyLoraConfig  # noqa: PLC0415
            cfg = DyLoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets,
                               init_lora_weights="gaussian", dylora_seed=seed)
        else:
            raise ValueError(f"unknown method {method!r}")
        pm = get_peft_model(model, cfg, seed=seed)
    opt, sched = make_optimizer(pm)
    trainer_kwargs.setdefault("max_grad_norm", 1.0)  # clipping is part of the step being resumed
    trainer = Trainer(pm, opt, sched, checkpoint_dir=checkpoint_dir, checkpoint_every=every, **trainer_kwargs)
    return trainer, SeededBatches(tokens(), batch_size=B, seq_len=T, seed=seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--method", default="full")
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--steps", type=int, default=TOTAL)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--pause", default=None, help="STEP:FILE, pause inside that checkpoint write")
    ap.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep after each step")
    args = ap.parse_args(argv)
    trainer, batches = build(args.method, args.dtype, checkpoint_dir=args.dir, every=args.every)
    if args.pause:
        from spectral_peft.io import checkpoint  # noqa: PLC0415
        pstep, pfile = args.pause.split(":")

        def hook(name):
            if trainer.step == int(pstep) and name == pfile:
                print("PAUSED", flush=True)
                time.sleep(60)

        checkpoint._after_file_hook = hook
    trainer.resume()
    print(f"resumed {trainer.step}", flush=True)

    def report(m):
        print(f"step {m['step']} {float(m['loss']).hex()}", flush=True)
        if args.step_sleep:
            time.sleep(args.step_sleep)

    trainer.fit(batches, args.steps, callback=report)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
