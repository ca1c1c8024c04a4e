"""The main job's base model: a small GPT-2 (or, with ``--arch llama``, a small Llama) pretrained by
the engine, cached in Hugging Face layout.

The base is pretrained on the standard library's source code (spectral_peft.data) and written as
config.json + model.safetensors under the cache folder, in a folder ``base-<arch>-<key>`` named by
the hash of everything that determines its weights, so later runs load it instead of pretraining
again.

Shape legend: B batch, T sequence length (= n_positions), V = 256 byte vocabulary, C = n_embd,
H = n_head, Hkv key/value heads (Llama), F SwiGLU width (Llama).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import numpy as np

from ..data import ByteTokenizer
from ..model import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
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


def llama_config(cfg) -> LlamaConfig:
    """The base's Llama shape, sized like the GPT-2 base: the same width C, layers, heads H, positions
    and byte vocabulary; grouped-query attention with Hkv = H/2 key/value heads; SwiGLU width F =
    8C/3 rounded to a multiple of 8 (3·C·F ≈ 8C², GPT-2's 2·C·4C MLP weights); tied embeddings as
    GPT-2's; rope_theta 10000; no dropout."""
    return LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=cfg.n_embd,
                       intermediate_size=8 * max(1, round(cfg.n_embd / 3)), num_hidden_layers=cfg.n_layer,
                       num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head // 2,
                       max_position_embeddings=cfg.n_positions, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attention_dropout=0.0)


# --arch -> (the base's config from the run options, its model class)
BASES = {"gpt2": (gpt2_config, GPT2LMHeadModel), "llama": (llama_config, LlamaForCausalLM)}


def base_config(cfg):
    """The base's model config (GPT2Config or LlamaConfig) from the run options."""
    return BASES[cfg.arch][0](cfg)


def new_base(cfg, backend):
    """A freshly initialised base (seed cfg.seed) of the run options' architecture and shape."""
    return BASES[cfg.arch][1](base_config(cfg), backend, seed=cfg.seed)


def base_cache_key(cfg, corpus_sha: str) -> str:
    """Everything that determines the pretrained weights, hashed."""
    key = {"n_positions": cfg.n_positions, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
           "pretrain_steps": cfg.pretrain_steps, "pretrain_lr": cfg.pretrain_lr, "batch_size": cfg.batch_size,
           "seed": cfg.seed, "dtype": cfg.dtype, "corpus": corpus_sha, "format": 1}
    if cfg.arch != "gpt2":  # GPT-2's key predates --arch and is kept, so its existing caches stay valid
        key["model"] = base_config(cfg).to_dict()  # model_type and every shape field
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
    folder = os.path.join(cache_root, f"base-{cfg.arch}-{base_cache_key(cfg, corpus.summary()['sha256'])}")
    record = _cached(folder, log)
    if record is not None:
        return folder, record
    model = new_base(cfg, backend)
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
