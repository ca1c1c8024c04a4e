"""One LoRA training step of GPT-2: the engine (NumPy float32) against transformers + PEFT (torch CPU),
then LoRA-FA's cached activation bytes against LoRA's.

The benchmark model of PERFORMANCE.md: GPT-2 shape, 4 layers, d_model 256, 4 heads, T 128, batch 8,
vocab 512; LoRA r = 8, lora_alpha = 16 on c_attn, c_proj (attention and MLP) and c_fc; AdamW
(lr 1e-4, weight decay 0.01) on the adapter parameters; dropout off; both on 2 threads.

Same weights on both sides: the engine's base model is written with save_pretrained and its adapter
with adapters.peft_model.save_adapter; transformers loads the first and PEFT the second (PeftModel.from_pretrained,
trainable). Same batch. step = forward with labels, backward, AdamW step, zero_grad; the two are
timed in turn in every repeat (noise from other processes falls on both alike); medians after a
warm-up. The first losses of both sides are printed as a check that they run the same model.

Memory: ``model.activation_bytes()`` right after the forward (every array the caches hold, each
counted once), for LoRA and for LoRA-FA at the same configuration, and the part held by the
adapter layers alone.

The last line is ONE JSON object: engine_ms, peft_ms, ratio (engine/peft), lorafa_activation_ratio
(LoRA-FA/LoRA, whole model), the adapter-only ratio, bytes and losses.

Run: python benchmarks/lora.py [--repeats N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from _threads import THREADS  # noqa: E402,F401  (benchmarks/_threads.py: before NumPy loads BLAS)

import numpy as np  # noqa: E402
from _common import optimizers, time_pair  # noqa: E402  (benchmarks/_common.py)

from spectral_peft.adapters.lora import LoraConfig  # noqa: E402
from spectral_peft.adapters.lorafa import LoraFAConfig  # noqa: E402
from spectral_peft.adapters.peft_model import get_peft_model  # noqa: E402
from spectral_peft.backend import get_backend  # noqa: E402
from spectral_peft.adapters.peft_model import save_adapter  # noqa: E402
from spectral_peft.model import GPT2Config, GPT2LMHeadModel, save_pretrained  # noqa: E402

B, T, V, L, C, H = 8, 128, 512, 4, 256, 4
R, ALPHA = 8, 16
TARGETS = ["c_attn", "c_proj", "c_fc"]
LR, WD = 1e-4, 0.01


def gpt2_config() -> GPT2Config:
    return GPT2Config(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0)


def make_pair(seed: int = 0, device: str = "cpu", torch_device: str = "cpu"):
    """(engine PeftModel + AdamW on ``device``, torch PeftModel + AdamW on ``torch_device``) holding
    the same weights."""
    import peft  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    transformers.logging.set_verbosity_error()
    model = GPT2LMHeadModel(gpt2_config(), get_backend(device, "float32"), seed=seed)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, os.path.join(d, "base"))
        pm = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS), seed=seed)
        save_adapter(pm, os.path.join(d, "adapter"))
        tm = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(d, "base"), dtype=torch.float32)
        pm_t = peft.PeftModel.from_pretrained(tm, os.path.join(d, "adapter"), is_trainable=True).to(torch_device)
    opt, topt = optimizers(pm, pm_t, LR, WD)
    return pm, opt, pm_t, topt


def activation_bytes(config_cls, ids, seed: int = 0) -> tuple[int, int]:
    """(whole model, adapter layers alone) cached bytes right after a training forward."""
    model = GPT2LMHeadModel(gpt2_config(), get_backend("cpu", "float32"), seed=seed)
    pm = get_peft_model(model, config_cls(r=R, lora_alpha=ALPHA, target_modules=TARGETS), seed=seed)
    pm.train()
    pm.forward(ids, labels=ids)
    total = pm.activation_bytes()
    seen, adapter = set(), 0
    for _, layer in pm.adapter_layers():
        from spectral_peft.module import iter_arrays  # noqa: PLC0415

        for a in iter_arrays(layer.cache):
            if id(a) not in seen:
                seen.add(id(a))
                adapter += int(a.nbytes)
    pm.clear_cache()
    return total, adapter


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=2, help="BLAS and torch threads on both sides (default 2)")
    args = p.parse_args(argv)
    import torch  # noqa: PLC0415

    torch.set_num_threads(THREADS)
    ids = np.random.default_rng(1).integers(0, V, (B, T))
    pm, opt, pm_t, topt = make_pair()
    ms, _, loss_e, loss_t = time_pair(pm, opt, pm_t, topt, ids, args.repeats)
    engine_ms, peft_ms = ms["engine"], ms["torch"]
    ratio = engine_ms / peft_ms
    print(f"LoRA r={R} alpha={ALPHA} on {TARGETS}, GPT-2 L={L} C={C} H={H} T={T} B={B} V={V}, float32, "
          f"{THREADS} threads, {args.repeats} repeats")
    print(f"  first loss: engine {loss_e:.6f}, PEFT {loss_t:.6f}")
    print(f"  step: engine {engine_ms:.1f} ms, transformers+PEFT {peft_ms:.1f} ms, ratio {ratio:.3f} (target <= 0.6)")

    lora_total, lora_adapter = activation_bytes(LoraConfig, ids)
    fa_total, fa_adapter = activation_bytes(LoraFAConfig, ids)
    fa_ratio = fa_total / lora_total
    print(f"  activation bytes after forward: LoRA {lora_total / 2**20:.2f} MiB, LoRA-FA {fa_total / 2**20:.2f} MiB, "
          f"ratio {fa_ratio:.3f} (target <= 0.7)")
    print(f"  adapter layers alone: LoRA {lora_adapter / 2**20:.2f} MiB, LoRA-FA {fa_adapter / 2**20:.2f} MiB, "
          f"ratio {fa_adapter / lora_adapter:.3f}")
    print(json.dumps({
        "benchmark": "lora", "engine_ms": round(engine_ms, 2), "peft_ms": round(peft_ms, 2),
        "ratio": round(ratio, 4), "lorafa_activation_ratio": round(fa_ratio, 4),
        "lorafa_adapter_activation_ratio": round(fa_adapter / lora_adapter, 4),
        "lora_activation_bytes": lora_total, "lorafa_activation_bytes": fa_total,
        "loss_engine": loss_e, "loss_peft": loss_t, "repeats": args.repeats, "threads": THREADS,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
