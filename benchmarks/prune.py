"""Pruned frozen base: bytes and step time against the dense base, in one run (docs/pruning.md).

Part 1. One frozen linear, 1024×1024 float32, 1024 tokens: forward y = x Wᵀ plus the input
gradient dX = dY W, dense GEMMs against the CSR SparseLinear (scipy.sparse / cupyx SpMM) at 50%,
90% and 99% magnitude sparsity (and at 50% with compute="dense": CSR scattered to a dense
temporary, one GEMM, "csr50d"), and the 2:4 NMSparseLinear (scattered to dense, one GEMM), timed
in turn within each repeat (medians). Bytes of each stored weight against the dense 4 MiB.

Part 2. The benchmark model of PERFORMANCE.md (GPT-2 shape, 4 layers, d_model 256, 4 heads, T 128,
batch 8, vocab 512; LoRA r = 8, lora_alpha 16 on c_attn, c_proj, c_fc; float32; AdamW lr 1e-3):
one training step (forward, backward, AdamW, zero_grad) of LoRA on the dense base against LoRA on
the base pruned (magnitude; Wanda stores and computes the same for the same sparsity) at 50%, 70%
(CSR; 50% also with compute="dense") and 2:4 (packed), alternating, medians. Frozen bytes of the pruned linears against float32.

Prints tables, then ONE JSON line. Run: python benchmarks/prune.py [--quick] [--device cpu|gpu]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
from _common import benchmark_batches, benchmark_model_config, interleaved_ms  # noqa: E402  (beside this script)

from spectral_peft.backend import get_backend, to_host  # noqa: E402
from spectral_peft.module import Linear  # noqa: E402
from spectral_peft.prune import PRUNED_TYPES, magnitude_mask, nm_mask, prune_model  # noqa: E402
from spectral_peft.prune.layers import NMSparseLinear, SparseLinear  # noqa: E402

TARGETS = ["c_attn", "c_proj", "c_fc"]
CONTENDERS = {"magnitude50": dict(sparsity=0.5), "magnitude70": dict(sparsity=0.7),
              "magnitude50-densecompute": dict(sparsity=0.5, compute="dense"), "magnitude2:4": dict(nm=(2, 4))}


def _sync(be):
    if be.device == "gpu":
        be.xp.cuda.Stream.null.synchronize()


def part1(be, repeats: int) -> dict:
    xp = be.xp
    rng = np.random.default_rng(0)
    W = rng.standard_normal((1024, 1024)).astype(np.float32)
    x = xp.asarray(rng.standard_normal((1024, 1024)).astype(np.float32))
    dy = xp.asarray(rng.standard_normal((1024, 1024)).astype(np.float32))
    dense = Linear(xp.asarray(W))
    dense.freeze("weight")
    layers = {"dense": dense}
    for s in (0.5, 0.9, 0.99):
        layers[f"csr{int(100 * s)}"] = SparseLinear.from_linear(dense, xp.asarray(magnitude_mask(W, s)))
    layers["csr50d"] = SparseLinear.from_linear(dense, xp.asarray(magnitude_mask(W, 0.5)), compute="dense")
    layers["2:4"] = NMSparseLinear.from_linear(dense, xp.asarray(nm_mask(np.abs(W), 2, 4)), 2, 4)

    def fwd_bwd(layer):
        def f():
            layer.forward(x)
            layer.backward(dy)
            _sync(be)
        return f

    ms, _ = interleaved_ms({k: fwd_bwd(v) for k, v in layers.items()}, repeats)
    out = {}
    print(f"one frozen linear 1024×1024 float32, 1024 tokens, forward + dX, median of {repeats} ({be.device}):")
    for k, layer in layers.items():
        b = W.nbytes if k == "dense" else layer.weight_bytes()
        print(f"  {k:>6}: {ms[k]:8.2f} ms  (×{ms[k] / ms['dense']:.2f} of dense)   {b:>10,} bytes (×{b / W.nbytes:.3f})")
        out[f"layer_{k}_ms"] = ms[k]
        out[f"layer_{k}_bytes_ratio"] = b / W.nbytes
    return out


def part2(be, repeats: int) -> dict:
    from spectral_peft.adapters.lora import LoraConfig  # noqa: PLC0415
    from spectral_peft.adapters.peft_model import get_peft_model  # noqa: PLC0415
    from spectral_peft.model import GPT2LMHeadModel  # noqa: PLC0415
    from spectral_peft.optim import AdamW  # noqa: PLC0415

    cfg = benchmark_model_config()
    batches = benchmark_batches()

    def build(how):
        model = GPT2LMHeadModel(cfg, be, seed=0)
        dense_bytes = sum(int(model.get_submodule(p).params["weight"].nbytes)
                          for p, m in model.named_modules() if type(m) is Linear and p.rsplit(".", 1)[-1] in TARGETS)
        if how != "dense":
            prune_model(model, "magnitude", target_modules=TARGETS, **CONTENDERS[how])
        stored = sum(m.weight_bytes() for _, m in model.named_modules() if isinstance(m, PRUNED_TYPES))
        peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS), seed=0)
        opt = AdamW(peft, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        return peft, opt, dense_bytes, stored if how != "dense" else dense_bytes

    state = {"i": 0}
    built = {how: build(how) for how in ("dense", *CONTENDERS)}

    def step(peft, opt):
        def f():
            ids = be.asarray(batches[state["i"] % len(batches)])
            state["i"] += 1
            out = peft.forward(ids, labels=ids)
            peft.backward()
            opt.step()
            peft.zero_grad()
            float(to_host(out.loss))
        return f

    ms, _ = interleaved_ms({k: step(p, o) for k, (p, o, _, _) in built.items()}, repeats)
    dense_bytes = built["dense"][2]
    print(f"\nGPT-2 shape (4 layers, d 256, T 128, batch 8), float32, AdamW, LoRA r=8 α=16 on {','.join(TARGETS)}, "
          f"median of {repeats} steps ({be.device}):")
    out = {"lora_dense_ms": ms["dense"], "dense_target_bytes": dense_bytes}
    for k, (_, _, _, stored) in built.items():
        print(f"  LoRA on {k:>24}: {ms[k]:8.1f} ms/step (ratio {ms[k] / ms['dense']:.3f})   target weights "
              f"{stored:>10,} bytes (ratio {stored / dense_bytes:.4f})")
        if k != "dense":
            out[f"lora_{k}_ms"] = ms[k]
            out[f"{k}_step_ratio"] = ms[k] / ms["dense"]
            out[f"{k}_bytes_ratio"] = stored / dense_bytes
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    args = ap.parse_args(argv)
    be = get_backend(args.device, "float32")
    r1, r2 = (3, 3) if args.quick else (9, 11)
    res = {"device": args.device}
    res.update(part1(be, r1))
    res.update(part2(be, r2))
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
