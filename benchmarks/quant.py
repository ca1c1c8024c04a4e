"""Quantisation benchmarks: NF4 throughput against bitsandbytes, QLoRA against LoRA, memory.

Part 1. quantize_4bit / dequantize_4bit on one 4096×4096 float32 matrix (NF4, blocksize 64, no
double quantisation, as the peer's throughput figures in PERFORMANCE.md), spectral_peft's NumPy
fast paths against bitsandbytes' CPU backend on the same tensor, timed in turn within each repeat
(medians). Throughput is counted on the float32 side: 64 MiB per call. Both results are also
checked equal (packed codes, absmax, dequantised values).

Part 2. The benchmark model of PERFORMANCE.md (GPT-2 shape, 4 layers, d_model 256, 4 heads, T 128,
batch 8, vocab 512; LoRA r = 8, lora_alpha 16 on c_attn, c_proj, c_fc; float32; AdamW lr 1e-3):
one training step (forward, backward, AdamW, zero_grad) of QLoRA (every base Linear in NF4,
blocksize 64, double quantisation) against LoRA on the dense float32 base, alternating, medians.
Frozen-weight bytes of the quantised linears against their float32 size.

Prints tables, then ONE JSON line. Run: python benchmarks/quant.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# torch's and bitsandbytes' OpenMP threads otherwise spin on the cores after each call, starving
# whatever runs next in the interleaved timing (measured: our dequantisation 10x slower right after
# a bitsandbytes call). Passive waiting leaves the peer's own work unchanged.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from _common import benchmark_batches, benchmark_model_config, interleaved_ms  # noqa: E402  (benchmarks/_common.py, beside this script)

from spectral_peft.quant import Linear4bit, dequantize_4bit, quantize_4bit, quantize_model  # noqa: E402


def part1(repeats: int) -> dict:
    import torch  # noqa: PLC0415
    import bitsandbytes.functional as F  # noqa: PLC0415

    torch.set_num_threads(2)
    W = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)
    Wt = torch.from_numpy(W)
    packed, state = quantize_4bit(W, 64, "nf4")
    pb, sb = F.quantize_4bit(Wt, blocksize=64, quant_type="nf4")
    same_codes = bool(np.array_equal(packed, pb.numpy()) and np.array_equal(state.absmax, sb.absmax.numpy()))
    same_values = bool(np.array_equal(dequantize_4bit(packed, state), F.dequantize_4bit(pb, sb).numpy()))
    ms, _ = interleaved_ms({
        "quant": lambda: quantize_4bit(W, 64, "nf4"),
        "bnb_quant": lambda: F.quantize_4bit(Wt, blocksize=64, quant_type="nf4"),
        "dequant": lambda: dequantize_4bit(packed, state),
        "bnb_dequant": lambda: F.dequantize_4bit(pb, sb),
    }, repeats)
    gb = W.nbytes / 1e9
    gbps = {k: gb / (v / 1e3) for k, v in ms.items()}
    print(f"NF4, 4096×4096 float32 (64 MiB), blocksize 64, median of {repeats} (GB/s on the float32 side)")
    print(f"  quantise   : spectral_peft {gbps['quant']:5.2f}   bitsandbytes {gbps['bnb_quant']:5.2f}"
          f"   ×{gbps['quant'] / gbps['bnb_quant']:.2f}")
    print(f"  dequantise : spectral_peft {gbps['dequant']:5.2f}   bitsandbytes {gbps['bnb_dequant']:5.2f}"
          f"   ×{gbps['dequant'] / gbps['bnb_dequant']:.2f}")
    print(f"  identical codes/absmax: {same_codes}; identical dequantised values: {same_values}")
    return dict(quant_gbps=gbps["quant"], bnb_quant_gbps=gbps["bnb_quant"], dequant_gbps=gbps["dequant"],
                bnb_dequant_gbps=gbps["bnb_dequant"], identical_codes=same_codes, identical_values=same_values)


def part2(repeats: int) -> dict:
    try:
        from spectral_peft.adapters.lora import LoraConfig  # noqa: PLC0415
        from spectral_peft.adapters.peft_model import get_peft_model  # noqa: PLC0415
        from spectral_peft.backend import get_backend  # noqa: PLC0415
        from spectral_peft.model import GPT2LMHeadModel  # noqa: PLC0415
        from spectral_peft.optim import AdamW  # noqa: PLC0415
    except ImportError as exc:
        print(f"part 2 skipped: the GPT-2 model, LoRA or AdamW is not available ({exc})")
        return {}
    be = get_backend("cpu", "float32")
    cfg = benchmark_model_config()
    batches = benchmark_batches()

    def build(quantised: bool):
        model = GPT2LMHeadModel(cfg, be, seed=0)
        dense_bytes = sum(m.params["weight"].nbytes for _, m in model.named_modules()
                          if type(m).__name__ == "Linear")
        if quantised:
            quantize_model(model, "nf4", 64, compress_statistics=True)
        peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"]),
                              seed=0)
        opt = AdamW(peft, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        q_bytes = sum(m.weight_bytes() for _, m in peft.named_modules() if isinstance(m, Linear4bit))
        return peft, opt, dense_bytes, q_bytes

    def step(peft, opt, i):
        ids = be.asarray(batches[i % len(batches)])
        out = peft.forward(ids, labels=ids)
        peft.backward()
        opt.step()
        peft.zero_grad()
        return float(out.loss)

    qlora, qopt, dense_bytes, q_bytes = build(True)
    lora, lopt, _, _ = build(False)
    losses = {"qlora": step(qlora, qopt, 0), "lora": step(lora, lopt, 0)}  # also the warm-up
    t = {"qlora": [], "lora": []}
    for i in range(1, repeats + 1):
        for name, (p, o) in (("qlora", (qlora, qopt)), ("lora", (lora, lopt))):
            t0 = time.perf_counter()
            step(p, o, i)
            t[name].append(time.perf_counter() - t0)
    q_ms, l_ms = 1e3 * float(np.median(t["qlora"])), 1e3 * float(np.median(t["lora"]))
    ratio_bytes = q_bytes / dense_bytes
    print(f"\nGPT-2 shape (4 layers, d 256, T 128, batch 8), float32, AdamW, LoRA r=8 α=16, median of {repeats} steps:")
    print(f"  QLoRA (NF4, b=64, double quant): {q_ms:7.1f} ms/step   first loss {losses['qlora']:.4f}")
    print(f"  LoRA (float32 base)            : {l_ms:7.1f} ms/step   first loss {losses['lora']:.4f}")
    print(f"  ratio {q_ms / l_ms:.3f}")
    print(f"  frozen linear weights: {q_bytes:,} bytes in NF4 vs {dense_bytes:,} in float32 "
          f"(×{ratio_bytes:.4f}, {8 * q_bytes / (dense_bytes / 4):.3f} bits per weight)")
    return dict(qlora_ms=q_ms, lora_ms=l_ms, ratio=q_ms / l_ms, weight_bytes_ratio=ratio_bytes,
                qlora_weight_bytes=q_bytes, float32_weight_bytes=dense_bytes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    args = ap.parse_args(argv)
    r1, r2 = (3, 3) if args.quick else (9, 15)
    res = part1(r1)
    res.update(part2(r2))
    targets = {"quant_x_bnb": res["quant_gbps"] / res["bnb_quant_gbps"],
               "dequant_x_bnb": res["dequant_gbps"] / res["bnb_dequant_gbps"]}
    print(f"\ntargets: quantise ×{targets['quant_x_bnb']:.2f} (>= 2), dequantise ×{targets['dequant_x_bnb']:.2f} (>= 2)"
          + (f", ratio {res['ratio']:.3f} (<= 1.3), weight bytes ×{res['weight_bytes_ratio']:.4f} (<= 0.13)"
             if "ratio" in res else ""))
    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}
    out.update({k: round(v, 3) for k, v in targets.items()})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
