"""AdaLoRA's training step against LoRA's, with the allocator's own time reported separately.

The benchmark model of PERFORMANCE.md: GPT-2 shape, 4 layers, d_model 256, 4 heads, T 128,
batch 8, vocab 512; adapters on c_attn, c_proj, c_fc (16 matrices:
c_proj matches attn.c_proj and mlp.c_proj); float32; AdamW lr 1e-3.

    AdaLoRA: init_r 8, target_r 4, tinit 0, tfinal 0, deltaT 1, total_step large, so every timed
             step updates the sensitivities and masks to b(t) (the allocator's worst case);
             step = forward, backward, regularize (orthogonal penalty and its gradient), AdamW,
             after_optimizer_step (update_and_allocate), zero_grad.
    LoRA:    r = 8, the same loop (no controller work).

The two are timed in turn within every repeat, the order alternating (load from other processes
falls on both alike);
medians (wall clock, and process CPU time as a check less sensitive to other processes). Prints a
table, then ONE JSON line with adalora_ms, lora_ms, ratio, allocator_ms, orth_ms, cpu_ratio.
Run: python benchmarks/adalora.py [--repeats N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
from _common import benchmark_batches, benchmark_model_config  # noqa: E402

from spectral_peft.adapters.adalora import AdaLoraConfig  # noqa: E402
from spectral_peft.adapters.lora import LoraConfig  # noqa: E402
from spectral_peft.adapters.peft_model import get_peft_model  # noqa: E402
from spectral_peft.backend import get_backend  # noqa: E402
from spectral_peft.model import GPT2LMHeadModel  # noqa: E402

TARGETS = ["c_attn", "c_proj", "c_fc"]


def make_adamw():
    """The engine's AdamW when present; otherwise a stand-in with torch's update (the same for both
    arms, so the ratio is unaffected), named in the output."""
    try:
        from spectral_peft.optim import AdamW  # noqa: PLC0415

        return (lambda m: AdamW(m, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)), "spectral_peft.optim.AdamW"
    except ImportError:
        pass

    class _AdamW:
        def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
            self.items = [(m, k) for _, m, k in model.named_parameters(trainable_only=True)]
            self.lr, self.b1, self.b2, self.eps, self.t = lr, betas[0], betas[1], eps, 0
            self.m = [np.zeros_like(m.params[k]) for m, k in self.items]
            self.v = [np.zeros_like(m.params[k]) for m, k in self.items]

        def step(self):
            self.t += 1
            c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
            for (mod, k), m, v in zip(self.items, self.m, self.v):
                g = mod.grads[k]
                m *= self.b1
                m += (1 - self.b1) * g
                v *= self.b2
                v += (1 - self.b2) * g * g
                mod.params[k] -= (self.lr / c1) * m / (np.sqrt(v / c2) + self.eps)

    return _AdamW, "in-script AdamW (spectral_peft.optim absent)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)

    be = get_backend("cpu", "float32")
    cfg = benchmark_model_config()
    batches = benchmark_batches()
    adamw, adamw_kind = make_adamw()

    def build(config):
        peft = get_peft_model(GPT2LMHeadModel(cfg, be, seed=0), config, seed=0)
        return peft, adamw(peft)

    ada_cfg = AdaLoraConfig(init_r=8, target_r=4, lora_alpha=16, tinit=0, tfinal=0, deltaT=1, total_step=100_000,
                            target_modules=TARGETS)
    lora_cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)
    arms = {"adalora": build(ada_cfg), "lora": build(lora_cfg)}
    ctl = arms["adalora"][0].controllers[0]
    extra = {"allocator": [], "orth": []}

    def step(name, i):
        peft, opt = arms[name]
        ids = be.asarray(batches[i % len(batches)])
        out = peft.forward(ids, labels=ids)
        peft.backward()
        loss = float(out.loss)
        t0 = time.perf_counter()
        for c in peft.controllers:
            loss += c.regularize()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        for c in peft.controllers:
            c.after_optimizer_step(i)
        t3 = time.perf_counter()
        peft.zero_grad()
        if name == "adalora":
            extra["orth"].append(t1 - t0)
            extra["allocator"].append(t3 - t2)
        return loss

    for i in (1, 2):  # warm-up (step 0 would not mask: t <= tinit)
        for name in arms:
            step(name, i)
    for name in extra:
        extra[name].clear()
    times = {name: [] for name in arms}
    cpu = {name: [] for name in arms}
    for rep in range(args.repeats):
        i = 3 + rep
        for name in (list(arms) if rep % 2 == 0 else list(arms)[::-1]):  # alternate who goes first
            c0, t0 = time.process_time(), time.perf_counter()
            step(name, i)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    cpu_ms = {k: 1e3 * float(np.median(v)) for k, v in cpu.items()}
    alloc_ms = 1e3 * float(np.median(extra["allocator"]))
    orth_ms = 1e3 * float(np.median(extra["orth"]))
    kept = ctl.history[-1][2]
    trainable = {k: arms[k][0].num_parameters(trainable_only=True) for k in arms}
    print(f"GPT-2 shape (4 layers, d 256, T 128, batch 8), float32, {adamw_kind}, median of {args.repeats} steps")
    print(f"  AdaLoRA init_r 8 -> target_r 4, allocating every step: {ms['adalora']:7.1f} ms/step "
          f"({trainable['adalora']:,} trainable; {kept} of {ctl.allocator.init_bgt} triplets kept at the last step)")
    print(f"    of which allocator (update_and_allocate): {alloc_ms:6.2f} ms, orthogonal regulariser: {orth_ms:6.2f} ms")
    print(f"  LoRA r 8:                                          {ms['lora']:7.1f} ms/step ({trainable['lora']:,} trainable)")
    ratio = ms["adalora"] / ms["lora"]
    cpu_ratio = cpu_ms["adalora"] / cpu_ms["lora"]
    print(f"  ratio AdaLoRA / LoRA: {ratio:.3f}   (target <= 1.05); by process CPU time {cpu_ratio:.3f} "
          f"({cpu_ms['adalora']:.1f} / {cpu_ms['lora']:.1f} ms: less sensitive to other processes' load)")
    print(json.dumps({"benchmark": "adalora_vs_lora_step", "adalora_ms": round(ms["adalora"], 3),
                      "lora_ms": round(ms["lora"], 3), "ratio": round(ratio, 4), "allocator_ms": round(alloc_ms, 3),
                      "orth_ms": round(orth_ms, 3), "cpu_ratio": round(cpu_ratio, 4),
                      "load_avg_1min": round(os.getloadavg()[0], 2), "repeats": args.repeats, "optimizer": adamw_kind,
                      "target_ratio": 1.05}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
