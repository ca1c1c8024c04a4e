"""Write the golden traces the tests compare the engine against without the live peers.

    python tests/golden/make_golden.py        # needs torch, bitsandbytes and peft; rewrites both files

bnb_4bit.safetensors: bitsandbytes.functional's own output for small fixed tensors (stored with
them): the NF4, FP4 and dynamic codebooks; for NF4 and FP4 the packed codes, block absmax and the
dequantised values of bitsandbytes' reference (pure-PyTorch) dequantisation; for NF4 with
compress_statistics the nested state (uint8 absmax codes, state2.absmax, offset) and the absmax it
dequantises to.

peft_adalora.safetensors: PEFT's AdaLoRA RankAllocator over a whole schedule (beta1 != beta2), in
float64: the initial adapter weights and, per step, the gradients it was given, the budget, the
EMAs Ī and Ū, the triplet scores (through PEFT's _element_score/_combine_ipt), lora_E after masking
and the rank_pattern once it is fixed. The parameters between steps follow p -= LR·g, the same
update the test applies.

Nothing here imports spectral_peft. The peer versions are written into each file's metadata.
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.numpy import save_file

import bitsandbytes
import bitsandbytes.functional as F
import peft
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from bitsandbytes.backends.utils import _get_4bit_code

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 32  # 320 blocks of the (64, 160) tensor: two blocks (256 + 64) in the nested state

# AdaLoRA trace: three adapted matrices, a schedule with a warm-up, masking every 2 steps and a final phase.
DIMS = [(5, 4), (3, 6), (4, 4)]  # (d_in, d_out)
SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, total_step=10, deltaT=2, beta1=0.7, beta2=0.9,
                lora_alpha=8)
STEPS = SCHEDULE["total_step"] + 2
LR = 0.05
KEYS = ("lora_A", "lora_E", "lora_B")


def bnb_dequantize_reference(packed, absmax, blocksize, quant_type, shape):
    """bitsandbytes' reference 4-bit dequantisation (its native CPU kernel indexes blocks per row)."""
    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    p = torch.from_numpy(np.ascontiguousarray(packed).reshape(-1))
    return fn(p, torch.from_numpy(absmax), _get_4bit_code(quant_type, p.device), blocksize, shape,
              torch.float32).numpy()


def bnb_tensors():
    rng = np.random.default_rng(20231203)
    a = (rng.standard_normal((16, 64)) * 0.05).astype(np.float32)
    a[3] = 0.0  # an all-zero block
    a[7] = 0.25  # a constant block
    b = rng.standard_normal((5, 77)).astype(np.float32)  # 385 values: odd, and a partial last block
    c = (rng.standard_normal((64, 160)) * 0.02).astype(np.float32)
    out = {"x.a": a, "x.b": b, "x.c": c,
           "code.nf4": F.get_4bit_type("nf4", "cpu").numpy(), "code.fp4": F.get_4bit_type("fp4", "cpu").numpy(),
           "code.dynamic": F.create_dynamic_map().numpy()}
    for name, x in (("a", a), ("b", b)):
        for qt in ("nf4", "fp4"):
            packed, state = F.quantize_4bit(torch.from_numpy(x), blocksize=BLOCKSIZE, quant_type=qt)
            key = f"{qt}.{name}"
            out[f"{key}.packed"] = packed.numpy()
            out[f"{key}.absmax"] = state.absmax.numpy()
            out[f"{key}.dequant"] = bnb_dequantize_reference(packed.numpy(), state.absmax.numpy(), BLOCKSIZE,
                                                             qt, x.shape)
    packed, state = F.quantize_4bit(torch.from_numpy(c), blocksize=NESTED_BLOCKSIZE, quant_type="nf4",
                                    compress_statistics=True)
    absmax = (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).numpy()
    out.update({"nested.packed": packed.numpy(), "nested.absmax_codes": state.absmax.numpy(),
                "nested.state2_absmax": state.state2.absmax.numpy(),
                "nested.offset": np.asarray(state.offset.numpy(), dtype=np.float32).reshape(1),
                "nested.absmax": absmax,
                "nested.dequant": bnb_dequantize_reference(packed.numpy(), absmax, NESTED_BLOCKSIZE, "nf4", c.shape)})
    meta = {"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__,
            "blocksize": str(BLOCKSIZE), "nested_blocksize": str(NESTED_BLOCKSIZE)}
    return out, meta


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for i, (d_in, d_out) in enumerate(DIMS):
            setattr(self, f"l{i}", torch.nn.Linear(d_in, d_out, bias=False))


def adalora_trace():
    names = [f"l{i}" for i in range(len(DIMS))]
    torch.manual_seed(0)
    cfg = peft.AdaLoraConfig(target_modules=names, **SCHEDULE)
    pm = peft.get_peft_model(TorchNet().double(), cfg).double()
    alloc = pm.base_model.rankallocator
    rng = np.random.default_rng(7)
    mods = [getattr(pm.base_model.model, n) for n in names]
    params = [{k: rng.standard_normal(tuple(getattr(m, k)["default"].shape)) for k in KEYS} for m in mods]
    out = {}
    for i, (m, p) in enumerate(zip(mods, params)):
        out[f"l{i}.weight"] = m.base_layer.weight.detach().numpy().copy()
        for k in KEYS:
            out[f"init.l{i}.{k}"] = p[k].copy()
    T, tfinal = SCHEDULE["total_step"], SCHEDULE["tfinal"]
    budgets, patterns = [], {}
    for step in range(STEPS):
        grads = [{k: rng.standard_normal(p[k].shape) for k in KEYS} for p in params]
        with torch.no_grad():
            for i, (m, p, g) in enumerate(zip(mods, params, grads)):
                for k in KEYS:
                    p[k] -= LR * g[k]
                    out[f"step{step}.grad.l{i}.{k}"] = g[k].copy()
                    t = getattr(m, k)["default"]
                    t.copy_(torch.from_numpy(p[k]))
                    t.grad = torch.from_numpy(g[k].copy())
        pm.base_model.update_and_allocate(step)
        budgets.append(alloc.budget_schedule(step)[0])
        for i, (m, p) in enumerate(zip(mods, params)):
            E = m.lora_E["default"].detach().numpy().copy()
            p["lora_E"][...] = E  # the masked E is what the next step updates
            out[f"step{step}.E.l{i}"] = E
            if step < T - tfinal:
                for k in KEYS:
                    name = f"l{i}.{k}.default"
                    out[f"step{step}.ipt.l{i}.{k}"] = alloc.exp_avg_ipt[name].numpy().copy()
                    out[f"step{step}.unc.l{i}.{k}"] = alloc.exp_avg_unc[name].numpy().copy()
                n = f"l{i}.%s.default"
                s_A = torch.mean(alloc._element_score(n % "lora_A"), dim=1, keepdim=True)
                s_B = torch.mean(alloc._element_score(n % "lora_B"), dim=0, keepdim=False).view(-1, 1)
                out[f"step{step}.scores.l{i}"] = alloc._combine_ipt(
                    alloc._element_score(n % "lora_E"), torch.cat([s_A, s_B], dim=1)).numpy().reshape(-1)
        if cfg.rank_pattern:
            patterns[str(step)] = {k.replace(".default", ""): v for k, v in cfg.rank_pattern.items()}
    out["budgets"] = np.array(budgets, dtype=np.int64)
    meta = {"peft": peft.__version__, "torch": torch.__version__, "schedule": json.dumps(SCHEDULE),
            "dims": json.dumps(DIMS), "steps": str(STEPS), "lr": repr(LR), "rank_patterns": json.dumps(patterns)}
    return out, meta


def main() -> int:
    for name, make in (("bnb_4bit.safetensors", bnb_tensors), ("peft_adalora.safetensors", adalora_trace)):
        arrays, meta = make()
        arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        save_file(arrays, os.path.join(HERE, name), metadata=meta)
        print(f"{name}: {len(arrays)} arrays, {sum(v.nbytes for v in arrays.values())} bytes, {meta}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
