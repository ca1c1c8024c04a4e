"""The data-parallel tests' worker: run under ``mpirun -n 2`` by tests/test_distributed.py, and
imported by it to train the same runs in the pytest process (one rank).

    python tests/_dist_worker.py all OUT        every method of the registry (METHODS), a few steps each,
                                                 results in OUT/<method>.npz and OUT/<method>.json
    python tests/_dist_worker.py resume OUT     LoRA with dropout 0.1 and checkpoints in OUT/ckpt, resuming from
                                                 the newest one; with DIST_KILL_STEP=k and DIST_KILL_RANK=r, rank r
                                                 SIGKILLs itself at step k; losses in OUT/losses-<n>.json
    python tests/_dist_worker.py bad_batch OUT  a global batch of 3 rows (not divisible by 2)
    python tests/_dist_worker.py mismatch OUT   rank 1 builds its optimiser with another learning rate
    python tests/_dist_worker.py buckets OUT    the GradientReducer alone, 64-byte buckets; OUT/buckets-<rank>.json
    python tests/_dist_worker.py nan_skip OUT   rank 1's gradient is NaN at step 2 (nan_raise: nonfinite="raise");
                                                 each rank writes OUT/<mode>-<rank>.json

The runs: a tiny random GPT-2 (vocabulary 64, T 16, d 16, 2 layers, dropout 0) in float64, saved as
a Hugging Face folder and loaded per method as `spectral-peft run` does (commands/method.py), each
method's recipe at a small size, AdamW with the run's schedule and clipping, SeededBatches of 4 rows.
"""
from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's spectral_peft

from spectral_peft import distributed
from spectral_peft.adapters.lora import LoraConfig
from spectral_peft.adapters.peft_model import get_peft_model
from spectral_peft.adapters.registry import METHODS, recipe
from spectral_peft.backend import get_backend, to_host
from spectral_peft.commands.method import build_method
from spectral_peft.commands.run_options import RunConfig
from spectral_peft.model import GPT2Config, GPT2LMHeadModel, save_pretrained
from spectral_peft.optim import make_adamw
from spectral_peft.train import NonFiniteError, SeededBatches, Trainer

STEPS = 6
BATCH = 4
SIZES = {"r": 2, "init_r": 3, "d": 0.05, "num_virtual_tokens": 2, "": None}


def options():

    return RunConfig(steps=STEPS, r=2, target_modules="c_attn,c_proj,c_fc", spa_num_grads=2, deltaT=1, tinit=1,
                     tfinal=2, schedule="wl2", n_positions=16, n_layer=2, n_embd=16, n_head=2, dtype="float64",
                     blocksize=32, batch_size=BATCH, lora_dropout=0.0, max_grad_norm=1.0, progress=False)


def base_folder(out: str, comm) -> str:
    """The tiny base, written by rank 0 (the others wait), as the run caches its pretrained one."""

    folder = os.path.join(out, "base")
    if comm.is_main:
        cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0)
        save_pretrained(GPT2LMHeadModel(cfg, get_backend("cpu", "float64"), seed=3), folder)
    comm.barrier()
    return folder


def tokens():
    return np.random.default_rng(7).integers(0, 64, size=600)


def train_one(name: str, folder: str, comm, steps: int = STEPS, batch: int = BATCH, **trainer_kwargs):
    """(trainer, model, batches) after ``steps`` steps of method ``name``."""

    cfg = options()
    rec = recipe(name)
    size = SIZES[rec.knob]
    model, _ = build_method(rec, cfg, folder, get_backend("cpu", "float64"), size)
    window = cfg.n_positions - size if rec.knob == "num_virtual_tokens" else cfg.n_positions
    opt, sched = make_adamw(model, getattr(cfg, rec.lr_option), cfg.weight_decay, cfg.steps)
    trainer = Trainer(model, opt, sched, max_grad_norm=cfg.max_grad_norm, comm=comm, **trainer_kwargs)
    batches = SeededBatches(tokens(), batch, window, seed=5)
    trainer.fit(batches, steps)
    return trainer, model, batches


def record(name: str, trainer, model, batches) -> tuple[dict, dict]:
    """(arrays: every parameter, meta: losses, AdaLoRA's rank pattern, RoSA's supports)."""

    arrays = {n: np.array(to_host(m.params[k])) for n, m, k in model.named_parameters()}
    meta = {"losses": [float(h["loss"]) for h in trainer.history], "eval": trainer.evaluate(eval_set(batches.seq_len)),
            "tokens": [h["tokens"] for h in trainer.history], "keys": sorted(trainer.history[-1])}
    for c in getattr(model, "controllers", []):
        if hasattr(c, "rank_pattern"):
            meta["rank_pattern"] = {k: [bool(b) for b in v] for k, v in (c.rank_pattern() or {}).items()}
        if hasattr(c, "sparse_layers"):
            meta["supports"] = {p: [int(i) for i in to_host(m.spa.indices)] + [-1] + [int(i) for i in to_host(m.spa.indptr)]
                                for p, m in c.sparse_layers() if m.spa is not None}
    return arrays, meta


def eval_set(window: int):
    """3 held-out batches of 4 windows (evaluated sharded: rank r takes batches r, r + N, ...)."""
    t = np.random.default_rng(8).integers(0, 64, size=3 * 4 * window).reshape(3, 4, window)
    return [{"input_ids": b, "labels": b} for b in t]


def main(mode: str, out: str) -> int:

    comm = distributed.world()
    os.makedirs(out, exist_ok=True)
    if mode == "all":
        folder = base_folder(out, comm)
        for name in METHODS:
            trainer, model, batches = train_one(name, folder, comm)
            arrays, meta = record(name, trainer, model, batches)
            meta["ms_comm"] = [h["ms_comm"] for h in trainer.history]
            meta["world_size"] = trainer.history[-1]["world_size"]
            if comm.is_main:
                np.savez(os.path.join(out, f"{name}.npz"), **arrays)
                with open(os.path.join(out, f"{name}.json"), "w") as f:
                    json.dump(meta, f)
        return 0
    if mode == "resume":

        kill_step, kill_rank = int(os.environ.get("DIST_KILL_STEP", "-1")), int(os.environ.get("DIST_KILL_RANK", "-1"))
        cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.1,
                         embd_pdrop=0.1, attn_pdrop=0.1)
        model = get_peft_model(GPT2LMHeadModel(cfg, get_backend("cpu", "float64"), seed=3),
                               LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["c_attn", "c_fc"]))
        opt, sched = make_adamw(model, 1e-2, 0.0, 10)
        trainer = Trainer(model, opt, sched, max_grad_norm=1.0, comm=comm, checkpoint_dir=os.path.join(out, "ckpt"),
                          checkpoint_every=2)
        start = trainer.resume()
        losses = []

        def step_done(m):
            losses.append(float(m["loss"]).hex())
            if m["step"] == kill_step and comm.rank == kill_rank:
                os.kill(os.getpid(), signal.SIGKILL)

        trainer.fit(SeededBatches(tokens(), BATCH, 16, seed=5), 10, callback=step_done)
        if comm.is_main:
            with open(os.path.join(out, f"losses-{start}.json"), "w") as f:
                json.dump({"start": start, "losses": losses,
                           "params": {n: np.array(m.params[k]).tolist() for n, m, k in
                                      model.named_parameters(trainable_only=True)}}, f)
        return 0
    if mode == "bad_batch":
        folder = base_folder(out, comm)
        train_one("lora", folder, comm, steps=1, batch=3)
        return 0
    if mode == "mismatch":
        folder = base_folder(out, comm)
        opts = options()

        model, _ = build_method(recipe("lora"), opts, folder, get_backend("cpu", "float64"), 2)
        opt, sched = make_adamw(model, 1e-3 if comm.rank == 0 else 2e-3, 0.0, STEPS)
        Trainer(model, opt, sched, comm=comm).fit(SeededBatches(tokens(), BATCH, 16, seed=5), 1)
        return 0
    if mode in ("nan_skip", "nan_raise"):  # rank 1's gradient turns NaN at step 2 (0-based), only there

        folder = base_folder(out, comm)

        def poisoned(trainer):
            model, real = trainer.model, trainer.model.backward

            def backward(*args, **kwargs):
                dx = real(*args, **kwargs)
                if comm.rank == 1 and trainer.step == 2:
                    _, m, k = next(iter(model.named_parameters(trainable_only=True)))
                    m.grads[k].reshape(-1)[0] = np.nan
                return dx
            model.backward = backward

        nonfinite = "skip" if mode == "nan_skip" else "raise"

        model, _ = build_method(recipe("lora"), options(), folder, get_backend("cpu", "float64"), 2)
        opt, sched = make_adamw(model, 1e-2, 0.0, STEPS)
        trainer = Trainer(model, opt, sched, comm=comm, nonfinite=nonfinite)
        poisoned(trainer)
        result = {"rank": comm.rank}
        try:
            trainer.fit(SeededBatches(tokens(), BATCH, 16, seed=5), 4)
        except NonFiniteError as exc:
            result.update(error=str(exc), parameter=exc.parameter, step=exc.step)
        result["skipped"] = trainer.skipped
        result["params"] = {n: np.array(m.params[k]).tolist() for n, m, k in model.named_parameters(trainable_only=True)}
        with open(os.path.join(out, f"{mode}-{comm.rank}.json"), "w") as f:
            json.dump(result, f)
        return 0
    if mode == "buckets":  # the reducer alone, over MPI: 64-byte buckets, two dtypes, rank r's n_r = r + 1
        r = comm.rank
        arrays = [np.full((5, 2), r + 1.0), np.arange(5, dtype=np.float32) * (r + 1), np.array([10.0 * r])]
        red = distributed.GradientReducer(comm, bucket_bytes=64)
        total, loss, bad = red.reduce_(arrays, float(r + 1), 0.5 + r, bad=(r == 1))
        with open(os.path.join(out, f"buckets-{r}.json"), "w") as f:
            json.dump({"total": total, "loss": loss, "bad": bad, "buckets": len(red._buckets),
                       "arrays": [a.tolist() for a in arrays], "dtypes": [str(a.dtype) for a in arrays]}, f)
        return 0
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
