"""The transformer ops, forward + backward, against PyTorch autograd on the benchmark shapes.

Shapes (PERFORMANCE.md's benchmark model): B 8, T 128, C 256, H 4 (hd 64), MLP width 4C, V 512;
float32; 2 threads (OPENBLAS_NUM_THREADS, torch.set_num_threads). Each repeat times the engine and
torch in turn, so load from other processes falls on both alike; medians after warm-up.
The host allocator is left as it is; run with
  MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_TOP_PAD_=0
to see the ops without glibc's page-fault churn (it changes torch's times too).
The last line is ONE JSON object: per op, engine ms, torch ms and their ratio.

Run: python benchmarks/ops.py [--repeats N]
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402

from spectral_peft.ops import (attention_backward, attention_forward, cross_entropy_backward,  # noqa: E402
                               cross_entropy_forward, dropout_backward, dropout_forward, embedding_backward,
                               embedding_forward, gelu_backward, gelu_forward, layernorm_backward,
                               layernorm_forward, softmax_backward, softmax_forward)

B, T, C, H, V = 8, 128, 256, 4, 512
N, HD = B * T, C // H


def cases():
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    f32 = np.float32
    x = rng.standard_normal((B, T, C)).astype(f32)
    w, b = rng.standard_normal(C).astype(f32), rng.standard_normal(C).astype(f32)
    h = rng.standard_normal((B, T, 4 * C)).astype(f32)
    q, k, v = (rng.standard_normal((B, H, T, HD)).astype(f32) for _ in range(3))
    logits = rng.standard_normal((N, V)).astype(f32)
    targets = rng.integers(0, V, N)
    ids = rng.integers(0, V, (B, T))
    table = rng.standard_normal((V, C)).astype(f32)

    def leaf(a):
        return torch.tensor(a, requires_grad=True)

    def ln_ours():
        _, c = layernorm_forward(x, w, b, 1e-5)
        layernorm_backward(x, c, w)

    def ln_torch():
        tx, tw, tb = leaf(x), leaf(w), leaf(b)
        F.layer_norm(tx, (C,), tw, tb, 1e-5).backward(torch.from_numpy(x))

    def gelu_ours():
        _, c = gelu_forward(h, "tanh")
        gelu_backward(h, c)

    def gelu_torch():
        F.gelu(leaf(h), approximate="tanh").backward(torch.from_numpy(h))

    def attn_ours():
        _, c = attention_forward(q, k, v, True)
        attention_backward(q, c)

    def attn_torch():
        F.scaled_dot_product_attention(leaf(q), leaf(k), leaf(v), is_causal=True).backward(torch.from_numpy(q))

    def ce_ours():
        _, c = cross_entropy_forward(logits, targets)
        cross_entropy_backward(1.0, c)

    def ce_torch():
        F.cross_entropy(leaf(logits), torch.from_numpy(targets)).backward()

    def emb_ours():
        _, c = embedding_forward(ids, table)
        embedding_backward(x, c)

    def emb_torch():
        F.embedding(torch.from_numpy(ids), leaf(table)).backward(torch.from_numpy(x))

    def drop_ours():
        _, c = dropout_forward(h, 0.1, np.random.default_rng(0), True)
        dropout_backward(h, c)

    def drop_torch():
        F.dropout(leaf(h), 0.1, True).backward(torch.from_numpy(h))

    def softmax_ours():
        _, c = softmax_forward(logits)
        softmax_backward(logits, c)

    def softmax_torch():
        torch.softmax(leaf(logits), -1).backward(torch.from_numpy(logits))

    return {"layernorm": (ln_ours, ln_torch), "gelu_tanh": (gelu_ours, gelu_torch),
            "attention_causal": (attn_ours, attn_torch), "cross_entropy": (ce_ours, ce_torch),
            "embedding": (emb_ours, emb_torch), "dropout": (drop_ours, drop_torch),
            "softmax": (softmax_ours, softmax_torch)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    result = {"benchmark": "ops", "shape": {"B": B, "T": T, "C": C, "H": H, "V": V}, "ops": {}}
    for name, (ours, theirs) in cases().items():
        for _ in range(3):
            ours(), theirs()
        t_ours, t_torch = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ours()
            t1 = time.perf_counter()
            theirs()
            t2 = time.perf_counter()
            t_ours.append(t1 - t0)
            t_torch.append(t2 - t1)
        e, t = 1e3 * float(np.median(t_ours)), 1e3 * float(np.median(t_torch))
        print(f"{name:18s} engine {e:8.3f} ms   torch {t:8.3f} ms   ratio {e / t:5.2f}")
        result["ops"][name] = {"engine_ms": round(e, 4), "torch_ms": round(t, 4), "ratio": round(e / t, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
