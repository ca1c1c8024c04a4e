"""A small, fully seeded training run, shared by the resume tests and run by them as a subprocess.

As a script it trains (resuming from the newest checkpoint in --dir when one exists) and prints
one line per step, ``step <n> <loss as float.hex()>``, flushed, so the test can kill it at any
point with SIGKILL. ``--pause STEP:FILE`` makes the checkpoint writer stop, after writing FILE
into the temporary directory of step STEP's checkpoint, print ``PAUSED`` and sleep: the test
kills it there, in the middle of a checkpoint write.

The model is the team's tiny GPT-2 (2 layers, d 32, T 16) once spectral_peft.model provides it,
otherwise a stand-in language model with the same kind of parts (embedding, two Linears named
c_fc / c_proj, dropout with its own generator, cross-entropy). The optimiser is
spectral_peft.optim.AdamW once it exists, otherwise a stand-in heavy-ball SGD with state.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

import numpy as np

from spectral_peft.backend import get_backend, host_rng
from spectral_peft.module import Linear, Module
from spectral_peft.ops.activation import gelu_backward, gelu_forward
from spectral_peft.ops.dropout import dropout_backward, dropout_forward
from spectral_peft.ops.embedding import embedding_backward, embedding_forward
from spectral_peft.ops.loss import cross_entropy_backward, cross_entropy_forward
from spectral_peft.train import SeededBatches, Trainer

V, C, T, B = 64, 32, 16, 2  # vocabulary, width, sequence, batch
TOTAL = 12  # the schedule length every method is configured for
TARGETS = ["c_fc", "c_proj"]


# ------------------------------------------------------------------------------------------------
# Stand-ins used until the team's model / optimiser land
# ------------------------------------------------------------------------------------------------
class _MLP(Module):
    def __init__(self, rng, dtype):
        super().__init__()
        self.c_fc = Linear(rng.normal(0, 0.2, (2 * C, C)).astype(dtype), np.zeros(2 * C, dtype))
        self.c_proj = Linear(rng.normal(0, 0.2, (C, 2 * C)).astype(dtype), np.zeros(C, dtype))


class TinyLM(Module):
    """logits = c_proj(dropout(gelu(c_fc(wte[ids])))) Wᵀ_head; (B, T) ids -> (B, T, V) logits."""

    def __init__(self, backend, seed=0, dropout=0.1):
        super().__init__()
        rng = host_rng(seed)
        dt = backend.float
        self.backend = backend
        self.config = SimpleNamespace(vocab_size=V)
        self.wte = Module()
        self.wte.params["weight"] = rng.normal(0, 0.5, (V, C)).astype(dt)
        self.mlp = _MLP(rng, dt)
        self.lm_head = Linear(rng.normal(0, 0.2, (V, C)).astype(dt))
        self.p = dropout
        self.dropout_rng = np.random.default_rng(seed + 1000)

    def forward(self, input_ids, labels=None, attention_mask=None):
        x, ecache = embedding_forward(input_ids, self.wte.params["weight"])  # (B, T) -> (B, T, C)
        h = self.mlp.c_fc(x)  # (B, T, 2C)
        g, gcache = gelu_forward(h)
        gd, dcache = dropout_forward(g, self.p, self.dropout_rng, self.training)
        y = x + self.mlp.c_proj(gd)  # (B, T, C)
        logits = self.lm_head(y)  # (B, T, V)
        loss = lcache = None
        if labels is not None:  # next-token prediction, shifted as Hugging Face does
            lg = logits[:, :-1].reshape(-1, V)
            loss, lcache = cross_entropy_forward(lg, labels[:, 1:].reshape(-1))
        self.cache = (ecache, gcache, dcache, lcache, logits.shape)
        return SimpleNamespace(logits=logits, loss=loss)

    def backward(self, dlogits=None):
        ecache, gcache, dcache, lcache, shape = self.cache
        if dlogits is None:
            dl = np.zeros(shape, dtype=self.backend.float)
            dl[:, :-1] = cross_entropy_backward(1.0, lcache).reshape(shape[0], shape[1] - 1, V)
            dlogits = dl
        dy = self.lm_head.backward(dlogits)
        dx = dy.copy()  # y = x + f(x)  =>  dx = dy + df
        dg = dropout_backward(self.mlp.c_proj.backward(dy), dcache)
        dx += self.mlp.c_fc.backward(gelu_backward(dg, gcache))
        if "weight" not in self.wte.frozen:
            self.wte.accumulate("weight", embedding_backward(dx, ecache))
        self.cache = None


class HeavyBall:
    """v = μ v + g; p -= lr v, on the trainable parameters (a stand-in with state)."""

    def __init__(self, model, lr=0.02, momentum=0.9):
        self.model, self.lr, self.momentum = model, lr, momentum
        self.v: dict = {}
        self.t = 0

    def step(self):
        self.t += 1
        for name, m, k in self.model.named_parameters(trainable_only=True):
            g = m.grads.get(k)
            if g is None:
                continue
            v = self.v.setdefault(name, np.zeros_like(g))
            v *= self.momentum
            v += g
            m.params[k] -= self.lr * v

    def state_dict(self):
        return {"lr": self.lr, "t": self.t, "v": {k: v.copy() for k, v in self.v.items()}}

    def load_state_dict(self, state):
        self.lr, self.t = state["lr"], state["t"]
        self.v = {k: np.array(v) for k, v in state["v"].items()}


def _gpt2(backend, seed):
    try:
        from spectral_peft.model import GPT2Config, GPT2LMHeadModel  # noqa: PLC0415
    except ImportError:
        return None
    cfg = GPT2Config(vocab_size=V, n_positions=T, n_embd=C, n_layer=2, n_head=2,
                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return GPT2LMHeadModel(cfg, backend, seed=seed)


def make_model(backend, seed):
    if os.environ.get("SPECTRAL_PEFT_TEST_STANDIN") != "1":
        m = _gpt2(backend, seed)
        if m is not None:
            return m, ["c_attn", "c_fc"]
    return TinyLM(backend, seed), TARGETS


def make_optimizer(model):
    try:
        from spectral_peft.optim import AdamW  # noqa: PLC0415
    except ImportError:
        return HeavyBall(model), None
    opt = AdamW(model, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    from spectral_peft.optim import LinearWarmupLinearDecay  # noqa: PLC0415
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
        elif method == "dylora":  # the rank stream: b ~ U{1..r_max} each step
            from spectral_peft.adapters.dylora import DyLoraConfig  # noqa: PLC0415
            cfg = DyLoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets,
                               init_lora_weights="gaussian", dylora_seed=seed)
        else:
            raise ValueError(f"unknown method {method!r}")
        pm = get_peft_model(model, cfg, seed=seed)
    opt, sched = make_optimizer(pm)
    if not isinstance(opt, HeavyBall):
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
