"""The transformer ops, forward + backward, against PyTorch autograd on the benchmark shapes.

Shapes (PERFORMANCE.md's benchmark model): B 8, T 128, C 256, H 4 (hd 64), MLP width 4C, V 512;
float32; 2 threads (OPENBLAS_NUM_THREADS, torch.set_num_threads). Each repeat times the engine and
torch in turn, so load from other processes falls on both alike; medians after warm-up.
The host allocator is left as it is; run with
  MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_TOP_PAD_=0
to see the ops without glibc's page-fault churn (it changes torch's times too).
The last line is ONE JSON object: per op, engine ms, torch ms and their ratio; and under "passes"
the element-wise ops' forward and backward alone, ms before and after the pass reduction
(the versions before are kept below, in this file only, as the timing baseline), interleaved.

Under "query_blocks": causal attention forward + backward at T 128-1024, one block against the
blocked path (ops/attention.py, causal_query_blocks), engine against itself.

Run: python benchmarks/ops.py [--repeats N] [--skip-torch] [--query-blocks]
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
                               embedding_forward, fanout_backward, gelu_backward, gelu_forward, layernorm_backward,
                               layernorm_forward, residual_forward, rmsnorm_backward, rmsnorm_forward,
                               softmax_backward, softmax_forward)
from spectral_peft.ops import attention as attention_module  # noqa: E402
from spectral_peft.ops.activation import GELU_C, GELU_K, sigmoid, swiglu_backward, swiglu_forward  # noqa: E402
from spectral_peft.ops.norm import _col_sum, _row_dot_mean, _row_mean  # noqa: E402

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


# --- the timing baseline: the versions before the pass reduction (not used by the engine) ---
def _before_layernorm_backward(dy, cache, weight):
    xhat, rstd = cache
    dbias = _col_sum(dy)
    t = dy * xhat
    dweight = _col_sum(t)
    g = dy * weight
    mean_gx = _row_dot_mean(g, xhat)  # a row-wise einsum over g and x̂
    g -= _row_mean(g)
    np.multiply(xhat, mean_gx, out=t)
    g -= t
    g *= rstd
    return g, dweight, dbias


def _before_rmsnorm_backward(dy, cache, weight):
    xhat, rstd = cache
    t = dy * xhat
    dweight = _col_sum(t)
    g = dy * weight
    mean_gx = _row_dot_mean(g, xhat)
    np.multiply(xhat, mean_gx, out=t)
    g -= t
    g *= rstd
    return g, dweight


def _before_softmax_backward(dy, cache):
    y, axis = cache
    dx = dy * y
    s = dx.sum(axis=axis, keepdims=True)
    np.subtract(dy, s, out=dx)
    dx *= y
    return dx


def _before_gelu_tanh_backward(dy, cache):
    x, _ = cache
    s = x * x
    s *= GELU_C * GELU_K
    s += GELU_K
    s *= x
    np.tanh(s, out=s)
    s *= 0.5
    s += 0.5
    ds = x * x
    ds *= 6.0 * GELU_C * GELU_K
    ds += 2.0 * GELU_K
    ds *= s
    ds *= 1.0 - s
    ds *= x
    ds += s
    ds *= dy
    return ds


def _before_swiglu_backward(dy, cache):
    gate, up = cache
    s = sigmoid(gate)
    dup = gate * s
    dup *= dy
    ds = 1.0 - s
    ds *= s
    d = dy * up  # the (N, F) temporary the new version avoids
    ds *= gate
    ds += s
    ds *= d
    return ds, dup


def _before_dropout_forward(x, p, rng, training):
    keep = rng.random(x.shape, dtype=x.dtype) >= p
    scale = 1.0 / (1.0 - p)
    y = x * scale
    y *= keep
    return y, (keep, scale)


def pass_cases():
    """op -> (forward before, forward after, backward before, backward after), each a thunk;
    before is after where the op was not changed."""
    rng = np.random.default_rng(1)
    f32 = np.float32
    x = rng.standard_normal((B, T, C)).astype(f32)
    dy = rng.standard_normal((B, T, C)).astype(f32)
    w, b = rng.standard_normal(C).astype(f32), rng.standard_normal(C).astype(f32)
    h = rng.standard_normal((B, T, 4 * C)).astype(f32)
    dh = rng.standard_normal((B, T, 4 * C)).astype(f32)
    logits = rng.standard_normal((N, V)).astype(f32)
    dlog = rng.standard_normal((N, V)).astype(f32)
    targets = rng.integers(0, V, N)
    _, ln_c = layernorm_forward(x, w, b, 1e-5)
    _, rms_c = rmsnorm_forward(x, w, 1e-6)
    _, gelu_c = gelu_forward(h, "tanh")
    _, sm_c = softmax_forward(logits)
    _, drop_c = dropout_forward(h, 0.1, np.random.default_rng(0), True)
    _, swi_c = swiglu_forward(h, dh)

    def ce_fwd():
        return cross_entropy_forward(logits, targets)

    def ce_bwd():  # the backward consumes its cache: a fresh forward's cache each time (timed apart below)
        return cross_entropy_backward(1.0, CE_CACHE.pop())

    def same(f):
        return (f, f)

    return {
        "layernorm": (*same(lambda: layernorm_forward(x, w, b, 1e-5)),
                      lambda: _before_layernorm_backward(dy, ln_c, w), lambda: layernorm_backward(dy, ln_c, w)),
        "rmsnorm": (*same(lambda: rmsnorm_forward(x, w, 1e-6)),
                    lambda: _before_rmsnorm_backward(dy, rms_c, w), lambda: rmsnorm_backward(dy, rms_c, w)),
        "gelu_tanh": (*same(lambda: gelu_forward(h, "tanh")),
                      lambda: _before_gelu_tanh_backward(dh, gelu_c), lambda: gelu_backward(dh, gelu_c)),
        "swiglu": (*same(lambda: swiglu_forward(h, dh)),
                   lambda: _before_swiglu_backward(dh, swi_c), lambda: swiglu_backward(dh, swi_c)),
        "softmax": (*same(lambda: softmax_forward(logits)),
                    lambda: _before_softmax_backward(dlog, sm_c), lambda: softmax_backward(dlog, sm_c)),
        "dropout": (lambda: _before_dropout_forward(h, 0.1, np.random.default_rng(0), True),
                    lambda: dropout_forward(h, 0.1, np.random.default_rng(0), True),
                    *same(lambda: dropout_backward(dh, drop_c))),
        "residual": (*same(lambda: residual_forward(x, dy)), *same(lambda: fanout_backward(x, dy))),
        "cross_entropy": (*same(ce_fwd), *same(ce_bwd)),
    }


CE_CACHE: list = []


def time_passes(repeats: int) -> dict:
    """Medians (ms) of each op's forward and backward, before and after, interleaved per repeat."""
    out = {}
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((N, V)).astype(np.float32)
    targets = rng.integers(0, V, N)
    print(f"\nelement-wise passes, float32, shapes of the benchmark model; median of {repeats} (ms)")
    print(f"{'op':14s} {'fwd before':>10s} {'after':>8s} {'x':>5s}   {'bwd before':>10s} {'after':>8s} {'x':>5s}")
    for name, fns in pass_cases().items():
        times = [[] for _ in fns]
        for rep in range(repeats + 2):
            order = [0, 1, 2, 3] if rep % 2 else [1, 0, 3, 2]  # before/after alternate who runs first
            for i in order:
                f = fns[i]
                if name == "cross_entropy" and i >= 2:
                    CE_CACHE.append(cross_entropy_forward(logits, targets)[1])
                t0 = time.perf_counter()
                f()
                if rep >= 2:
                    times[i].append(time.perf_counter() - t0)
        fb, fa, bb, ba = (1e3 * float(np.median(t)) for t in times)
        changed = {"fwd": fns[0] is not fns[1], "bwd": fns[2] is not fns[3]}
        print(f"{name:14s} {fb:10.3f} {fa:8.3f} {fb / fa:5.2f}   {bb:10.3f} {ba:8.3f} {bb / ba:5.2f}"
              f"   {'' if any(changed.values()) else '(unchanged)'}")
        out[name] = {"fwd_before_ms": round(fb, 4), "fwd_after_ms": round(fa, 4), "bwd_before_ms": round(bb, 4),
                     "bwd_after_ms": round(ba, 4), "fwd_changed": changed["fwd"], "bwd_changed": changed["bwd"]}
    return out


def time_query_blocks(repeats: int) -> dict:
    """Causal attention forward + backward at T 128-1024 (B·T = 1024 tokens, H 4, hd 64, float32):
    one block (every query against every key) against the blocked path (QUERY_BLOCK queries per
    block, the removed upper triangle skipped), interleaved per repeat; medians (ms)."""
    out = {}
    block = attention_module.QUERY_BLOCK
    print(f"\ncausal attention by query blocks of {block}, forward + backward, float32; median of {repeats} (ms)")
    print(f"{'T':>6s} {'one block':>10s} {'blocked':>9s} {'x':>6s}")
    for T_ in (128, 256, 512, 1024):
        rng = np.random.default_rng(T_)
        q, k, v, g = (rng.standard_normal((N // T_, H, T_, HD)).astype(np.float32) for _ in range(4))
        times = {"one": [], "blocked": []}
        for rep in range(repeats + 2):
            for name in (("one", "blocked") if rep % 2 else ("blocked", "one")):
                attention_module.QUERY_BLOCK = 10 ** 9 if name == "one" else block
                t0 = time.perf_counter()
                _, c = attention_forward(q, k, v, True)
                attention_backward(g, c)
                if rep >= 2:
                    times[name].append(time.perf_counter() - t0)
        attention_module.QUERY_BLOCK = block
        one, blocked = (1e3 * float(np.median(times[n])) for n in ("one", "blocked"))
        print(f"{T_:6d} {one:10.3f} {blocked:9.3f} {one / blocked:6.2f}")
        out[str(T_)] = {"one_block_ms": round(one, 4), "blocked_ms": round(blocked, 4),
                        "speedup": round(one / blocked, 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--skip-torch", action="store_true", help="only the before/after passes")
    parser.add_argument("--query-blocks", action="store_true", help="only the causal attention by query blocks")
    args = parser.parse_args()
    if args.query_blocks:
        print(json.dumps({"benchmark": "ops", "query_blocks": time_query_blocks(args.repeats)}))
        return
    result = {"benchmark": "ops", "shape": {"B": B, "T": T, "C": C, "H": H, "V": V}, "ops": {}}
    for name, (ours, theirs) in ({} if args.skip_torch else cases()).items():
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
    result["passes"] = time_passes(max(args.repeats, 41))
    result["query_blocks"] = time_query_blocks(args.repeats)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
