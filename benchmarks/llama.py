"""One LoRA training step of a Llama-shaped model: the engine (NumPy float32) against transformers +
PEFT (torch CPU, float32).

The model: LlamaConfig with 4 layers, hidden 256, 8 query heads, 2 key/value heads (grouped-query
attention, G = 4, head_dim 32), intermediate 688 (SwiGLU), vocab 512 (benchmarks/lora.py's),
untied head, default RoPE; T 128, batch 8. LoRA r = 8, lora_alpha = 16 on q_proj, k_proj, v_proj,
o_proj; AdamW (lr 1e-4, weight decay 0.01) on the adapter parameters; attention dropout off; both on
2 threads. The peer uses transformers' default attention implementation (sdpa, torch's
scaled_dot_product_attention; the script prints the one it got).

Same weights on both sides: the engine's base model is written with save_pretrained and its adapter
with adapters.peft_model.save_adapter; transformers loads the first and PEFT the second
(PeftModel.from_pretrained, trainable). Same batch. step = forward with labels, backward, AdamW
step, zero_grad; the two are timed in turn in every repeat (noise from other processes falls on
both alike); medians after a warm-up. The first losses of both sides are printed as a check that
they run the same model.

Then greedy generation with a model of the same shape at batch 1, 128 new tokens, against
transformers' generate (benchmarks/generate.py's measure; target >= 1.5x tokens/s).

The last line is ONE JSON object: engine_s, peer_s (median seconds per step), ratio (engine/peer),
target, the minima, the losses, the peer's attention implementation, repeats and threads, and the
generation figures (generation_tokens_per_s, generation_peer_tokens_per_s, generation_ratio).

Run: python benchmarks/llama.py [--repeats N] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from _threads import THREADS  # noqa: E402,F401  (benchmarks/_threads.py: before NumPy loads BLAS)

import numpy as np  # noqa: E402
from _common import OMP_WAIT_POLICY, optimizers, time_pair  # noqa: E402  (benchmarks/_common.py)

from spectral_peft.adapters.lora import LoraConfig  # noqa: E402
from spectral_peft.adapters.peft_model import get_peft_model, save_adapter  # noqa: E402
from spectral_peft.backend import get_backend  # noqa: E402
from spectral_peft.model import LlamaConfig, LlamaForCausalLM, save_pretrained  # noqa: E402

B, T, V, L, C, H, HKV, F = 8, 128, 512, 4, 256, 8, 2, 688
R, ALPHA = 8, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LR, WD = 1e-4, 0.01
TARGET_RATIO = 0.6


def llama_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=V, hidden_size=C, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
                       num_key_value_heads=HKV, max_position_embeddings=T)


def make_pair(seed: int = 0):
    """(engine PeftModel + AdamW, torch PeftModel + AdamW) holding the same weights, both float32."""
    import peft  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    transformers.logging.set_verbosity_error()
    model = LlamaForCausalLM(llama_config(), get_backend("cpu", "float32"), seed=seed)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, os.path.join(d, "base"))
        pm = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS), seed=seed)
        save_adapter(pm, os.path.join(d, "adapter"))
        # no attn_implementation: transformers' default (sdpa)
        tm = transformers.LlamaForCausalLM.from_pretrained(os.path.join(d, "base"), dtype=torch.float32)
        pm_t = peft.PeftModel.from_pretrained(tm, os.path.join(d, "adapter"), is_trainable=True)
    opt, topt = optimizers(pm, pm_t, LR, WD)
    return pm, opt, pm_t, topt, tm.config._attn_implementation


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=2, help="BLAS and torch threads on both sides (default 2)")
    args = p.parse_args(argv)
    import torch  # noqa: PLC0415

    torch.set_num_threads(THREADS)
    ids = np.random.default_rng(1).integers(0, V, (B, T))
    pm, opt, pm_t, topt, attn_impl = make_pair()
    ms, mins, loss_e, loss_t = time_pair(pm, opt, pm_t, topt, ids, args.repeats)
    engine_s, peer_s = ms["engine"] / 1e3, ms["torch"] / 1e3
    ratio = engine_s / peer_s
    print(f"LoRA r={R} alpha={ALPHA} on {TARGETS}, Llama L={L} C={C} H={H} Hkv={HKV} F={F} T={T} B={B} V={V}, "
          f"float32, {THREADS} threads, {args.repeats} repeats; peer attention: {attn_impl}")
    print(f"  first loss: engine {loss_e:.6f}, PEFT {loss_t:.6f}")
    print(f"  step (median): engine {engine_s:.4f} s, transformers+PEFT {peer_s:.4f} s, ratio {ratio:.3f} "
          f"(target <= {TARGET_RATIO})")
    print(f"  step (min):    engine {mins['engine'] / 1e3:.4f} s, transformers+PEFT {mins['torch'] / 1e3:.4f} s")
    # greedy generation of the same Llama shape at batch 1, 128 new tokens (benchmarks/generate.py)
    import tempfile  # noqa: PLC0415

    from generate import TARGET as GEN_TARGET  # noqa: PLC0415
    from generate import measure, models  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        gen = measure("llama", models(128)["llama"], 128, max(3, args.repeats // 3), tmp)
    generation = {"generation_tokens_per_s": gen["engine_tokens_per_s"],
                  "generation_peer_tokens_per_s": gen["peer_tokens_per_s"], "generation_ratio": gen["ratio"],
                  "generation_target": GEN_TARGET, "generation_same_tokens": gen["same_tokens"]}
    print(json.dumps({
        "bench": "llama_lora_step", "engine_s": round(engine_s, 5), "peer_s": round(peer_s, 5),
        "ratio": round(ratio, 4), "target": TARGET_RATIO, "engine_min_s": round(mins["engine"] / 1e3, 5),
        "peer_min_s": round(mins["torch"] / 1e3, 5), "peer_attn_implementation": attn_impl,
        "loss_engine": loss_e, "loss_peft": loss_t, "repeats": args.repeats, "threads": THREADS,
        "omp_wait_policy": OMP_WAIT_POLICY, **generation,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
