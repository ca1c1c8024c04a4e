"""The main job's base model: a small GPT-2 pretrained by the engine, cached in Hugging Face layout.

The base is pretrained on the standard library's source code (spectral_peft.data) and written as
config.json + model.safetensors under the cache folder, in a folder named by the hash of
everything that determines its weights, so later runs load it instead of pretraining again.

Shape legend: B batch, T sequence length (= n_positions), V = 256 byte vocabulary.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import numpy as np

from ..data import ByteTokenizer
from ..model import GPT2Config, GPT2LMHeadModel
from ..model.hf import load_pretrained, save_pretrained
from ..optim import make_adamw
from ..train import SeededBatches, Trainer


def default_cache_dir() -> str:
    return os.environ.get("SPECTRAL_PEFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "spectral_peft")


def gpt2_config(cfg) -> GPT2Config:
    """The base's GPT-2 shape from the run options (dropout off: the runs compare methods, not
    regularisers)."""
    return GPT2Config(vocab_size=ByteTokenizer.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                      n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def base_cache_key(cfg, corpus_sha: str) -> str:
    """Everything that determines the pretrained weights, hashed."""
    key = {"n_positions": cfg.n_positions, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
           "pretrain_steps": cfg.pretrain_steps, "pretrain_lr": cfg.pretrain_lr, "batch_size": cfg.batch_size,
           "seed": cfg.seed, "dtype": cfg.dtype, "corpus": corpus_sha, "format": 1}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _cached(folder: str, log) -> dict | None:
    record_path = os.path.join(folder, "pretrain.json")
    if not (os.path.exists(os.path.join(folder, "model.safetensors")) and os.path.exists(record_path)):
        return None
    with open(record_path, encoding="utf-8") as f:
        record = json.load(f)
    record.update(cached=True, cache_path=folder, seconds_this_run=0.0)
    log(f"base model: cached at {folder} (pretrained {record['steps']} steps, final loss {record['final_loss']:.3f})")
    return record


def pretrain_base(cfg, corpus, backend, log) -> tuple[str, dict]:
    """The cached base model's folder (HF layout) and its record; pretrains when not cached.

    The model is written to a temporary folder and renamed into place, so a cache folder is
    always complete; when a concurrent run finished first, its folder is kept."""
    cache_root = cfg.cache_dir or default_cache_dir()
    folder = os.path.join(cache_root, f"base-gpt2-{base_cache_key(cfg, corpus.summary()['sha256'])}")
    record = _cached(folder, log)
    if record is not None:
        return folder, record
    model = GPT2LMHeadModel(gpt2_config(cfg), backend, seed=cfg.seed)
    opt, sched = make_adamw(model, cfg.pretrain_lr, 0.0, cfg.pretrain_steps)
    trainer = Trainer(model, opt, sched, max_grad_norm=cfg.max_grad_norm, progress=cfg.progress,
                      progress_desc="pretraining the base")
    batches = SeededBatches(corpus.tokens, cfg.batch_size, cfg.n_positions, seed=cfg.seed + 1)
    t0 = time.perf_counter()
    losses = [float(m["loss"]) for m in trainer.fit(batches, cfg.pretrain_steps)]
    seconds = time.perf_counter() - t0
    model.clear_cache()
    os.makedirs(cache_root, exist_ok=True)
    tmp = folder + f".tmp{os.getpid()}"
    save_pretrained(model, tmp)
    tail = losses[-max(1, len(losses) // 10):]
    record = {"steps": cfg.pretrain_steps, "seconds": round(seconds, 2), "final_loss": float(np.mean(tail)),
              "loss_curve": [round(v, 4) for v in losses], "params": int(model.num_parameters())}
    with open(os.path.join(tmp, "pretrain.json"), "w", encoding="utf-8") as f:
        json.dump(record, f)
    if os.path.exists(folder):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    record.update(cached=False, cache_path=folder, seconds_this_run=round(seconds, 2))
    log(f"base model: pretrained {cfg.pretrain_steps} steps in {seconds:.1f} s, final loss {record['final_loss']:.3f}"
        f" nats/byte; cached at {folder}")
    return folder, record


def load_base(folder: str, backend):
    """A fresh copy of the cached base (every method starts from its own)."""
    return load_pretrained(folder, backend)
