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

Engine against engine: the same model fine-tuned in full (AdamW on every parameter) and
with LoRA, timed interleaved in a loop of their own (no torch step in it): ``lora_over_full``
(LoRA step / full step; a frozen base needs no weight gradients, so the FLOP floor is ~0.69) and
``lora_forward_over_full`` (LoRA training forward / full training forward; the r = 8 branches add
~1% of the FLOPs).

The last line is ONE JSON object: engine_ms, peft_ms, ratio (engine/peft), full_ms, lora_over_full,
lora_forward_over_full, lorafa_activation_ratio (LoRA-FA/LoRA, whole model), the adapter-only
ratio, bytes, losses, and ``widths`` (the same step figures at each d_model of ``--widths``).

--profile prints a per-op-kind breakdown (benchmarks/_profile.py) of the LoRA and the full step.
--fusion times, on the step's adapted shapes (N = B·T tokens, r 8), the ways of adding the branch to
the frozen base (forward y = x Wᵀ + s·(x Aᵀ) Bᵀ, backward dX = dY W + (s·dY B) A), interleaved medians:
"base" (the frozen product alone, the floor), "separate" (the branch as its own arrays, added),
"accumulate" (the engine's path: the branch gemm'd into the base output, ops.linear.matmul_add),
"stacked" (forward: one GEMM on the cached [W; A], then the B product accumulated into the strided
y; backward: one GEMM of [dY, s·dY B] on [W; A]); and, with the base's bias b, "base+bias" (full
fine-tuning's y = x Wᵀ, then y += b), "folded" (LoraLinear's float32 path where d_out <= d_in:
[xa | 1] [s·Bᵀ; b], then x Wᵀ accumulated onto it) and "k-stacked" (its path where d_out > d_in:
one GEMM [x | xa | 1] [Wᵀ; s·Bᵀ; b]).

Run: python benchmarks/lora.py [--repeats N] [--widths 256,512,1024] [--profile]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from _threads import THREADS  # noqa: E402,F401  (benchmarks/_threads.py: before NumPy loads BLAS)

import numpy as np  # noqa: E402
from _common import KEEP_FREED_MEMORY, OMP_WAIT_POLICY, engine_step, interleaved_ms, optimizers, torch_step  # noqa: E402  (benchmarks/_common.py)
import _common  # noqa: E402
from _profile import profile_steps  # noqa: E402  (benchmarks/_profile.py)

from spectral_peft.adapters.lora import LoraConfig  # noqa: E402
from spectral_peft.adapters.lorafa import LoraFAConfig  # noqa: E402
from spectral_peft.adapters.peft_model import get_peft_model  # noqa: E402
from spectral_peft.backend import get_backend  # noqa: E402
from spectral_peft.adapters.peft_model import save_adapter  # noqa: E402
from spectral_peft.model import GPT2Config, GPT2LMHeadModel, save_pretrained  # noqa: E402
from spectral_peft.optim import AdamW  # noqa: E402

B, T, V, L, C, H = 8, 128, 512, 4, 256, 4
R, ALPHA = 8, 16
TARGETS = ["c_attn", "c_proj", "c_fc"]
LR, WD = 1e-4, 0.01


def gpt2_config(C: int = C, H: int = H) -> GPT2Config:
    return GPT2Config(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0)


def make_pair(seed: int = 0, device: str = "cpu", torch_device: str = "cpu", C: int = C, H: int = H):
    """(engine PeftModel + AdamW on ``device``, torch PeftModel + AdamW on ``torch_device``) holding
    the same weights (d_model ``C``, ``H`` heads)."""
    import peft  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    transformers.logging.set_verbosity_error()
    model = GPT2LMHeadModel(gpt2_config(C, H), get_backend(device, "float32"), seed=seed)
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


def full_model(C: int = C, H: int = H, seed: int = 0):
    """(engine GPT2LMHeadModel, AdamW on every parameter): the same base as make_pair's, fine-tuned in full."""
    model = GPT2LMHeadModel(gpt2_config(C, H), get_backend("cpu", "float32"), seed=seed)
    model.train()
    return model, AdamW(model, lr=LR, weight_decay=WD)


def measure(C: int, H: int, ids, repeats: int, warmup: int = 2) -> dict:
    """The step figures at d_model ``C``: LoRA, full fine-tuning and PEFT steps and the two training
    forwards, all timed in turn in every repeat (medians)."""
    import torch  # noqa: PLC0415

    pm, opt, pm_t, topt = make_pair(C=C, H=H)
    full, fopt = full_model(C, H)
    ids_t = torch.tensor(ids)
    loss_e = engine_step(pm, opt, ids)  # identical weights on both sides for the first step
    loss_t = torch_step(pm_t, topt, ids_t)
    loss_f = engine_step(full, fopt, ids)
    # Two interleaved groups: engine against PEFT (``ratio``), and engine against engine without torch in
    # the loop (under libgomp's default wait policy torch's threads, still spinning after its step, slowed
    # whichever engine step came next: the full step measured 183 ms after a torch step and 166 ms in an
    # engine-only loop; _common sets OMP_WAIT_POLICY=PASSIVE against it, the engine-only loop stays).
    ms, mins = interleaved_ms({"engine": lambda: engine_step(pm, opt, ids),
                               "torch": lambda: torch_step(pm_t, topt, ids_t)}, repeats, warmup=warmup - 1)
    fns = {"lora": lambda: engine_step(pm, opt, ids), "full": lambda: engine_step(full, fopt, ids),
           "lora_fwd": lambda: pm.forward(ids, labels=ids), "full_fwd": lambda: full.forward(ids, labels=ids)}
    ms2, mins2 = interleaved_ms(fns, repeats, warmup=warmup - 1)
    ms.update(ms2)
    mins.update(mins2)
    pm.clear_cache()
    full.clear_cache()
    return {"d_model": C, "engine_ms": round(ms["engine"], 2), "peft_ms": round(ms["torch"], 2),
            "ratio": round(ms["engine"] / ms["torch"], 4), "full_ms": round(ms["full"], 2),
            "lora_ms": round(ms["lora"], 2), "lora_over_full": round(ms["lora"] / ms["full"], 4),
            "lora_forward_ms": round(ms["lora_fwd"], 2), "full_forward_ms": round(ms["full_fwd"], 2),
            "lora_forward_over_full": round(ms["lora_fwd"] / ms["full_fwd"], 4),
            "loss_engine": loss_e, "loss_peft": loss_t, "loss_full": loss_f,
            "min_ms": {k: round(v, 2) for k, v in mins.items()}}


def fusion(widths, repeats: int) -> list[dict]:
    """The --fusion table (module docstring): ms per variant per adapted shape, medians."""
    from spectral_peft.ops.linear import linear_forward, matmul_add  # noqa: PLC0415
    from spectral_peft.ops.lowrank import lowrank_forward, lowrank_stacked_forward  # noqa: PLC0415

    rng = np.random.default_rng(0)
    N, s, out = B * T, ALPHA / R, []
    print(f"fusion of the r={R} branch with the frozen base, N={N}, float32, {THREADS} threads, "
          f"ms (median of {repeats}; min in brackets)")
    for c in widths:
        for d_in, d_out in ((c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)):
            x = rng.standard_normal((N, d_in), dtype=np.float32)
            dy = rng.standard_normal((N, d_out), dtype=np.float32)
            W = rng.standard_normal((d_out, d_in), dtype=np.float32)
            A = rng.standard_normal((R, d_in), dtype=np.float32)
            Bm = rng.standard_normal((d_out, R), dtype=np.float32)
            WA = np.concatenate([W, A])  # the cached stacked weight (d_out + r, d_in)
            bias = rng.standard_normal(d_out, dtype=np.float32)
            V = np.concatenate([W.T, np.zeros((R, d_out), np.float32), bias[None]])  # [Wᵀ; s·Bᵀ; b], s·Bᵀ written per call

            def separate_f():
                y = x @ W.T
                yb = (x @ A.T) @ Bm.T
                yb *= s
                y += yb

            def accumulate_f():
                matmul_add(x @ W.T, x @ A.T, Bm.T, s)

            def stacked_f():
                yc = x @ WA.T  # (N, d_out + r): [x Wᵀ | x Aᵀ]
                matmul_add(yc[:, :d_out], yc[:, d_out:], Bm.T, s)

            def separate_b():
                dxa = dy @ Bm
                dxa *= s
                dx = dy @ W
                dx += dxa @ A

            def accumulate_b():
                dxa = dy @ Bm
                dxa *= s
                matmul_add(dy @ W, dxa, A)

            def stacked_b():
                cat = np.empty((N, d_out + R), np.float32)
                cat[:, :d_out] = dy
                np.matmul(dy, Bm, out=cat[:, d_out:])
                cat[:, d_out:] *= s
                cat @ WA

            def base_bias_f():
                y = x @ W.T
                y += bias

            def folded_f():  # LoraLinear's path where d_out <= d_in: s·xa Bᵀ + b, then x Wᵀ accumulated onto it
                y, _ = lowrank_forward(x, A, Bm, s, keep_x=False, bias=bias)
                linear_forward(x, W, None, keep_x=False, out=y)

            def kstacked_f():  # LoraLinear's path where d_out > d_in: [x | xa | 1] @ [Wᵀ; s·Bᵀ; b]
                lowrank_stacked_forward(x, x, A, Bm, s, V, keep_x=False)

            fns = {"fwd base": lambda: x @ W.T, "fwd separate": separate_f, "fwd accumulate": accumulate_f,
                   "fwd stacked": stacked_f, "fwd base+bias": base_bias_f, "fwd folded": folded_f,
                   "fwd k-stacked": kstacked_f, "bwd base": lambda: dy @ W, "bwd separate": separate_b,
                   "bwd accumulate": accumulate_b, "bwd stacked": stacked_b}
            ms, mins = interleaved_ms(fns, repeats, warmup=2)
            row = {"d_in": d_in, "d_out": d_out, **{k.replace(" ", "_"): round(v, 3) for k, v in ms.items()}}
            out.append(row)
            print(f"  {d_in:>5}->{d_out:<5} " + "  ".join(f"{k} {v:.3f} ({mins[k]:.3f})" for k, v in ms.items()))
    return out


def profile(ids, steps: int) -> dict:
    """Print the per-op-kind breakdown of the LoRA and the full fine-tuning step; return the rows."""
    pm, opt, _, _ = make_pair()
    full, fopt = full_model()
    out = {}
    for name, model, o in (("lora", pm, opt), ("full", full, fopt)):
        text, rows = profile_steps(model, o, lambda m=model, o=o: engine_step(m, o, ids), steps, warmup=2,
                                   title=f"profile: {name} step, d_model {C}, median of {steps} steps")
        print(text)
        out[name] = rows
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=2, help="BLAS and torch threads on both sides (default 2)")
    p.add_argument("--widths", default="", help="comma-separated d_model values to sweep, e.g. 256,512,1024 "
                   "(head width 64)")
    p.add_argument("--sweep-repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="print the per-op-kind breakdown of both steps")
    p.add_argument("--profile-steps", type=int, default=7)
    p.add_argument("--cpu-time", action="store_true", help="time with process CPU time, not the wall clock "
                   "(a loaded machine; use with --threads 1), see _common.set_cpu_clock")
    p.add_argument("--fusion", action="store_true", help="time the ways of adding the branch to the base, then stop")
    args = p.parse_args(argv)
    if args.cpu_time:
        _common.set_cpu_clock()
    if args.fusion:
        ws = [int(v) for v in args.widths.split(",") if v.strip()] or [C]
        print(json.dumps({"benchmark": "lora_fusion", "threads": THREADS, "rows": fusion(ws, args.repeats)}))
        return 0
    import torch  # noqa: PLC0415

    torch.set_num_threads(THREADS)
    ids = np.random.default_rng(1).integers(0, V, (B, T))
    m = measure(C, H, ids, args.repeats)  # fresh models: the first losses are compared on the same weights
    prof = profile(ids, args.profile_steps) if args.profile else None
    engine_ms, peft_ms, ratio = m["engine_ms"], m["peft_ms"], m["ratio"]
    print(f"LoRA r={R} alpha={ALPHA} on {TARGETS}, GPT-2 L={L} C={C} H={H} T={T} B={B} V={V}, float32, "
          f"{THREADS} threads, {args.repeats} repeats")
    print(f"  first loss: engine {m['loss_engine']:.6f}, PEFT {m['loss_peft']:.6f}, full {m['loss_full']:.6f}")
    print(f"  step: engine {engine_ms:.1f} ms, transformers+PEFT {peft_ms:.1f} ms, ratio {ratio:.3f} (target <= 0.5)")
    print(f"  engine LoRA step / engine full step (engine-only loop): {m['lora_ms']:.1f} / {m['full_ms']:.1f} ms = "
          f"{m['lora_over_full']:.3f} (target <= 0.75)")
    print(f"  engine LoRA forward / full forward: {m['lora_forward_ms']:.1f} / {m['full_forward_ms']:.1f} ms = "
          f"{m['lora_forward_over_full']:.3f} (target <= 1.05)")

    widths = []
    for w in [int(v) for v in args.widths.split(",") if v.strip()]:
        mw = m if w == C else measure(w, w // 64, ids, args.sweep_repeats, warmup=1)
        widths.append(mw)
        print(f"  d_model {w}: LoRA {mw['lora_ms']:.1f} ms, full {mw['full_ms']:.1f} ms (engine-only loop); LoRA "
              f"{mw['engine_ms']:.1f} vs PEFT {mw['peft_ms']:.1f} ms; "
              f"lora_over_full {mw['lora_over_full']:.3f}, lora_forward_over_full "
              f"{mw['lora_forward_over_full']:.3f}, ratio {mw['ratio']:.3f}")

    lora_total, lora_adapter = activation_bytes(LoraConfig, ids)
    fa_total, fa_adapter = activation_bytes(LoraFAConfig, ids)
    fa_ratio = fa_total / lora_total
    print(f"  activation bytes after forward: LoRA {lora_total / 2**20:.2f} MiB, LoRA-FA {fa_total / 2**20:.2f} MiB, "
          f"ratio {fa_ratio:.3f} (target <= 0.7)")
    print(f"  adapter layers alone: LoRA {lora_adapter / 2**20:.2f} MiB, LoRA-FA {fa_adapter / 2**20:.2f} MiB, "
          f"ratio {fa_adapter / lora_adapter:.3f}")
    record = {
        "benchmark": "lora", "engine_ms": engine_ms, "peft_ms": peft_ms, "ratio": ratio,
        "lora_ms": m["lora_ms"], "full_ms": m["full_ms"], "lora_over_full": m["lora_over_full"],
        "lora_forward_ms": m["lora_forward_ms"], "full_forward_ms": m["full_forward_ms"],
        "lora_forward_over_full": m["lora_forward_over_full"],
        "lorafa_activation_ratio": round(fa_ratio, 4),
        "lorafa_adapter_activation_ratio": round(fa_adapter / lora_adapter, 4),
        "lora_activation_bytes": lora_total, "lorafa_activation_bytes": fa_total,
        "loss_engine": m["loss_engine"], "loss_peft": m["loss_peft"], "repeats": args.repeats, "threads": THREADS,
        "keep_freed_memory": KEEP_FREED_MEMORY, "omp_wait_policy": OMP_WAIT_POLICY, "clock": "cpu" if args.cpu_time else "wall", "widths": [{k: v for k, v in w.items() if k != "min_ms"} for w in widths],
    }
    if prof is not None:
        record["profile"] = prof
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
