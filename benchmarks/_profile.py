"""A per-op-kind profile of engine training steps, taken from the benchmark side.

Nothing inside the ops times itself: :class:`StepProfile` replaces the ``forward`` and ``backward``
of each module INSTANCE of a model by a timed wrapper (an instance attribute, found before the class
method), and the tied head / loss functions in ``spectral_peft.model.gpt2``'s namespace and the
frozen base's product that LoRA's forward calls (``linear_forward`` in ``adapters/lora.py``'s
namespace) by timed ones, for as long as the ``with`` block lasts. Each wrapper charges its own (exclusive) time to its
op kind: a call's wall time minus the time of the wrapped calls it made, so a LoRA layer's figure is
its branch alone (its base Linear is charged to "linear base GEMM"), an attention module's is the
softmax/QK/PV core (its projections are Linears), a block's is the residual adds. Where LoRA takes
its base and branch in one GEMM over stacked operands (``lowrank_stacked_forward`` / ``_backward`` in
``adapters/lora.py``'s namespace, wrapped too), that call is charged to "stacked base+branch".

Kinds (forward and backward separately): linear base GEMM, LoRA branch, stacked base+branch, attention core, LayerNorm,
GELU (activation), dropout, residual (the blocks' adds), LM head GEMM, loss (cross-entropy),
embedding, other (model-level glue: input checks, reshapes), optimizer (step + zero_grad).

FLOPs (GFLOP/s column) are the GEMM FLOPs of the kind, counted from the shapes seen:
Linear 2·N·d_in·d_out per product (backward: dX, plus dW when W is trainable); LoRA branch
2·N·r·(d_in + d_out) forward, twice that backward (dB, dxa, dA, dx); attention 4·B·T²·C forward
(q kᵀ and p v, the causal mask not discounted, as step.py's model FLOPs), twice that backward;
LM head 2·N·C·V forward, backward dh plus dE when the embedding is trainable.

Use:
    text, rows = profile_steps(model, optimizer, lambda: engine_step(model, optimizer, ids), steps)
    print(text)          # medians over the steps of each kind's ms; GFLOP/s from the summed FLOPs
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict

KINDS = ("linear base GEMM", "LoRA branch", "stacked base+branch", "attention core", "LayerNorm", "GELU", "dropout", "residual",
         "LM head GEMM", "loss", "embedding", "other", "optimizer")


def _kind_of(module) -> str | None:
    """The op kind a module's exclusive time is charged to (None: not wrapped)."""
    from spectral_peft.adapters.base import AdapterLayer  # noqa: PLC0415
    from spectral_peft.model import layers  # noqa: PLC0415
    from spectral_peft.model.gpt2 import GPT2Attention  # noqa: PLC0415
    from spectral_peft.module import Linear  # noqa: PLC0415

    if isinstance(module, AdapterLayer):
        return "LoRA branch"
    if isinstance(module, Linear):
        return "linear base GEMM"
    if isinstance(module, GPT2Attention):
        return "attention core"
    if isinstance(module, (layers.LayerNorm, layers.RMSNorm)):
        return "LayerNorm"
    if isinstance(module, layers.Activation):
        return "GELU"
    if isinstance(module, layers.Dropout):
        return "dropout"
    if isinstance(module, layers.Embedding):
        return "embedding"
    if isinstance(module, layers.PreNormBlock):
        return "residual"
    return "other"


def _flops(module, kind: str, phase: str, args, shapes: dict) -> float:
    """GEMM FLOPs of one call (module docstring); ``shapes`` carries what a backward needs from its forward."""
    key = id(module)
    if kind == "linear base GEMM":
        if phase == "forward":
            n = args[0].size // args[0].shape[-1]
            shapes[key] = n
            return 2.0 * n * module.d_in * module.d_out
        n = args[0].size // args[0].shape[-1]  # dy (N, d_out)
        return 2.0 * n * module.d_in * module.d_out * (1 + ("weight" not in module.frozen))
    if kind == "LoRA branch" and hasattr(module, "r"):
        if getattr(module, "merged", False):
            return 0.0
        n = args[0].size // args[0].shape[-1] if phase == "forward" else shapes.get(key, 0)
        shapes[key] = n
        if shapes.pop("stacked", False):  # this call's products ran in a stacked GEMM, counted there
            return 0.0
        return 2.0 * n * module.r * (module.d_in + module.d_out) * (1 if phase == "forward" else 2)
    if kind == "attention core":
        if phase == "forward":
            x, (B, T) = args[0], args[1]
            shapes[key] = (B, T, x.shape[-1])
        B, T, C = shapes.get(key, (0, 0, 0))
        return 4.0 * B * T * T * C * (1 if phase == "forward" else 2)
    return 0.0


class StepProfile:
    """Exclusive wall time and GEMM FLOPs per (op kind, phase), summed over the profiled calls."""

    def __init__(self):
        self.seconds = defaultdict(float)  # (kind, phase) -> s
        self.flops = defaultdict(float)  # (kind, phase) -> FLOPs
        self._stack: list[float] = []  # children's inclusive time of each open call
        self._shapes: dict = {}

    def _timed(self, fn, kind: str, phase: str, flops=None):
        def wrapper(*args, **kwargs):
            self._stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                children = self._stack.pop()
                self.seconds[(kind, phase)] += dt - children
                if self._stack:
                    self._stack[-1] += dt
                if flops is not None:
                    self.flops[(kind, phase)] += flops(args)

        return wrapper

    @contextlib.contextmanager
    def attach(self, model, optimizer=None):
        """Wrap every module of ``model`` (and ``optimizer.step`` / ``zero_grad``) while the block runs."""
        from spectral_peft.model import gpt2  # noqa: PLC0415

        undo = []
        for _, m in model.named_modules():
            kind = _kind_of(m)
            for phase in ("forward", "backward"):
                orig = getattr(m, phase)
                fl = (lambda a, m=m, k=kind, p=phase: _flops(m, k, p, a, self._shapes))
                setattr(m, phase, self._timed(orig, kind, phase, fl))
                undo.append((m, phase))
        head_flops = {}

        def head_fwd_flops(args):
            h, emb = args[0], args[1]
            n, c = h.size // h.shape[-1], h.shape[-1]
            head_flops["f"] = 2.0 * n * c * emb.num_embeddings
            head_flops["b"] = head_flops["f"] * (1 + ("weight" not in emb.frozen))
            return head_flops["f"]

        patched = {"tied_head_forward": ("LM head GEMM", "forward", head_fwd_flops),
                   "tied_head_backward": ("LM head GEMM", "backward", lambda a: head_flops.get("b", 0.0)),
                   "shifted_loss": ("loss", "forward", None),
                   "upstream_dlogits": ("loss", "backward", None)}
        originals = {name: getattr(gpt2, name) for name in patched}
        for name, (kind, phase, fl) in patched.items():
            setattr(gpt2, name, self._timed(originals[name], kind, phase, fl))
        # LoRA's forward calls the frozen base's product itself (linear_forward(x, W, out=y), accumulated
        # onto the branch): charge it to the base GEMM kind, as the base module's own forward would be
        from spectral_peft.adapters import lora as lora_mod  # noqa: PLC0415

        lora_linear = lora_mod.linear_forward

        def base_flops(args):
            x, W = args[0], args[1]
            return 2.0 * (x.size // x.shape[-1]) * W.shape[0] * W.shape[1]

        lora_mod.linear_forward = self._timed(lora_linear, "linear base GEMM", "forward", base_flops)
        # where LoRA takes the base and the branch in one GEMM over stacked operands, that call is its own kind:
        # its FLOPs are the stacked product's plus the branch's side products (x Aᵀ; dB, dxa, dA as if A trains)
        stacked_fns = (lora_mod.lowrank_stacked_forward, lora_mod.lowrank_stacked_backward)

        def stacked_fwd_flops(args):  # (x, xd, A, B, s, V): [x | xa | 1] @ V and xa = xd Aᵀ
            x, A, V = args[0], args[2], args[5]
            self._shapes["stacked"] = True
            return 2.0 * (x.size // x.shape[-1]) * (V.shape[0] * V.shape[1] + A.shape[0] * A.shape[1])

        def stacked_bwd_flops(args):  # (dy, cache, A, B, s, U): [dY | s·dY B] @ U, dB, dxa, dA
            dy, A, U = args[0], args[2], args[5]
            self._shapes["stacked"] = True
            r, d_in, d_out = A.shape[0], A.shape[1], dy.shape[-1]
            return 2.0 * (dy.size // d_out) * (U.shape[0] * U.shape[1] + 2 * d_out * r + r * d_in)

        lora_mod.lowrank_stacked_forward = self._timed(stacked_fns[0], "stacked base+branch", "forward",
                                                       stacked_fwd_flops)
        lora_mod.lowrank_stacked_backward = self._timed(stacked_fns[1], "stacked base+branch", "backward",
                                                        stacked_bwd_flops)
        if optimizer is not None:
            for name in ("step", "zero_grad"):
                setattr(optimizer, name, self._timed(getattr(optimizer, name), "optimizer", "step"))
        try:
            yield self
        finally:
            for m, phase in undo:
                del m.__dict__[phase]
            for name, fn in originals.items():
                setattr(gpt2, name, fn)
            lora_mod.linear_forward = lora_linear
            lora_mod.lowrank_stacked_forward, lora_mod.lowrank_stacked_backward = stacked_fns
            if optimizer is not None:
                for name in ("step", "zero_grad"):
                    del optimizer.__dict__[name]

    def rows(self, steps: int) -> list[dict]:
        """One dict per op kind: ms per step and GFLOP/s, forward and backward."""
        out = []
        for kind in KINDS:
            row = {"kind": kind}
            for phase, tag in (("forward", "fwd"), ("backward", "bwd"), ("step", "step")):
                s = self.seconds.get((kind, phase), 0.0)
                f = self.flops.get((kind, phase), 0.0)
                if s or f:
                    row[f"{tag}_ms"] = round(1e3 * s / steps, 3)
                    if f:
                        row[f"{tag}_gflops"] = round(f / s / 1e9, 2) if s > 0 else None
            if len(row) > 1:
                out.append(row)
        return out

    def total_ms(self, steps: int) -> float:
        return 1e3 * sum(self.seconds.values()) / steps

    def table(self, steps: int, title: str = "") -> str:
        """The per-kind breakdown as aligned text (ms per step; GFLOP/s of the GEMM kinds)."""
        total = self.total_ms(steps)
        lines = [title] if title else []
        lines.append(f"  {'op kind':<18} {'fwd ms':>8} {'GFLOP/s':>8} {'bwd ms':>8} {'GFLOP/s':>8} {'share':>6}")

        def g(v):
            return f"{v:8.1f}" if v else f"{'':>8}"

        for r in self.rows(steps):
            ms = r.get("fwd_ms", 0) + r.get("bwd_ms", 0) + r.get("step_ms", 0)
            fwd = r.get("fwd_ms", r.get("step_ms", 0.0))
            lines.append(f"  {r['kind']:<18} {fwd:8.2f} {g(r.get('fwd_gflops'))} {r.get('bwd_ms', 0.0):8.2f} "
                         f"{g(r.get('bwd_gflops'))} {100 * ms / total:5.1f}%")
        fw = sum(v for (k, p), v in self.seconds.items() if p == "forward") * 1e3 / steps
        bw = sum(v for (k, p), v in self.seconds.items() if p == "backward") * 1e3 / steps
        lines.append(f"  {'total':<18} {fw:8.2f} {'':>8} {bw:8.2f} {'':>8}  step {total:.1f} ms "
                     "(optimizer in the fwd column)")
        return "\n".join(lines)


def profile_steps(model, optimizer, step_fn, steps: int, warmup: int = 1, title: str = "") -> tuple[str, list]:
    """(table text, rows) of ``steps`` calls of ``step_fn()`` after ``warmup`` unprofiled ones: each
    (kind, phase) figure is the MEDIAN over the steps (a burst of load from another process on a
    shared machine spoils one step, not the table)."""
    import numpy as np  # noqa: PLC0415

    for _ in range(warmup):
        step_fn()
    prof = StepProfile()
    per_step = []
    with prof.attach(model, optimizer):
        for _ in range(steps):
            prof.seconds.clear()
            step_fn()
            per_step.append(dict(prof.seconds))
    keys = {k for d in per_step for k in d}
    prof.seconds.clear()
    for k in keys:  # median per step, scaled back to a sum over ``steps`` as rows()/table() expect
        prof.seconds[k] = steps * float(np.median([d.get(k, 0.0) for d in per_step]))
    return prof.table(steps, title), prof.rows(steps)
