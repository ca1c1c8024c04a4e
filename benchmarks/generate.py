"""Greedy KV-cache generation: the engine (NumPy float32) against transformers' ``generate`` (torch
CPU float32), tokens per second at batch 1.

Models: the Llama-shaped benchmark model of the LLaMA issue (4 layers, hidden 256, 8 heads, 2
key/value heads, intermediate 688) and the GPT-2 benchmark model of PERFORMANCE.md (4 layers,
d_model 256, 4 heads); vocabulary 512, a 16-token prompt, 128 new tokens, no eos (exactly 128).
Same weights on both sides: the engine's model is written with save_pretrained and transformers
loads it (its default attention implementation, sdpa, and its own DynamicCache). Both on the same
threads (--threads, default 2). The two are timed in turn in every repeat (benchmarks/_common.py);
medians after a warm-up. The greedy sequences of the two must be identical (checked, printed).

The last line is ONE JSON object: per model engine and peer tokens/s and their ratio
(engine/peer; the target is >= 1.5 on the Llama model), and the engine's KV-cache bytes.

Run: python benchmarks/generate.py [--repeats N] [--threads N] [--new_tokens N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from _threads import THREADS  # noqa: E402,F401  (benchmarks/_threads.py: before NumPy loads BLAS)

import numpy as np  # noqa: E402
from _common import interleaved_ms  # noqa: E402  (benchmarks/_common.py, beside this script)

from spectral_peft.backend import get_backend  # noqa: E402
from spectral_peft.generation import generate  # noqa: E402
from spectral_peft.model import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, load_pretrained,  # noqa: E402
                                 save_pretrained)

VOCAB, PROMPT = 512, 16
TARGET = 1.5


def models(new_tokens: int) -> dict:
    positions = PROMPT + new_tokens
    return {
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688,
                                              num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                              max_position_embeddings=positions), get_backend("cpu", "float32"), 0),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=positions, n_embd=256, n_layer=4, n_head=4,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                                get_backend("cpu", "float32"), 0),
    }


def measure(name: str, model, new_tokens: int, repeats: int, tmp: str) -> dict:
    """Greedy generation of ``new_tokens`` after a PROMPT-token prompt at batch 1: the engine's
    ``model`` (float32) against transformers' generate on the same weights; prints one line and
    returns the figures."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    N = new_tokens
    ids = np.random.default_rng(0).integers(0, VOCAB, (1, PROMPT))
    d = os.path.join(tmp, name)
    save_pretrained(model, d)
    ours = load_pretrained(d, get_backend("cpu", "float32"))
    tm = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    gc = tm.generation_config
    gc.bos_token_id = gc.eos_token_id = None
    gc.pad_token_id = 0
    t_ids = torch.tensor(ids)
    results = {}

    def engine():
        results["engine"] = generate(ours, ids, max_new_tokens=N)

    def peer():
        with torch.no_grad():
            results["peer"] = tm.generate(input_ids=t_ids, attention_mask=torch.ones_like(t_ids),
                                          max_new_tokens=N, min_new_tokens=N, do_sample=False)

    med, mins = interleaved_ms({"engine": engine, "peer": peer}, repeats)
    same = bool(np.array_equal(results["engine"].sequences, results["peer"].numpy()))
    e_tps, p_tps = 1e3 * N / med["engine"], 1e3 * N / med["peer"]
    print(f"{name}: engine {e_tps:8.1f} tokens/s ({med['engine']:.0f} ms), transformers {p_tps:8.1f} tokens/s "
          f"({med['peer']:.0f} ms), ratio {e_tps / p_tps:.2f}x; same greedy tokens: {same}; KV cache "
          f"{results['engine'].cache_bytes} bytes")
    return {"engine_tokens_per_s": round(e_tps, 1), "peer_tokens_per_s": round(p_tps, 1),
            "ratio": round(e_tps / p_tps, 3), "engine_min_ms": round(mins["engine"], 1),
            "peer_min_ms": round(mins["peer"], 1), "same_tokens": same, "cache_bytes": results["engine"].cache_bytes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--new_tokens", type=int, default=128)
    args = ap.parse_args()
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    report = {"bench": "generate", "threads": args.threads, "batch": 1, "prompt": PROMPT, "new_tokens": args.new_tokens,
              "target_llama_ratio": TARGET}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models(args.new_tokens).items():
            report[name] = measure(name, model, args.new_tokens, args.repeats, tmp)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
