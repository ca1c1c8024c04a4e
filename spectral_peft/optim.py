"""Optimisers, gradient clipping and learning-rate schedules, as PyTorch and transformers define them.

Optimisers update IN PLACE ``module.params[key]`` from ``module.grads[key]`` for every trainable
parameter, collected once at construction as (dotted name, module, key) triples from
``model.named_parameters(trainable_only=True)`` (or given as such a list). A parameter with no
gradient yet (never reached by a backward) is skipped, as PyTorch skips ``grad is None``.

Shape legend: p, g, m, v, buf have each parameter's own shape.

SGD (torch.optim.SGD, dampening 0, no Nesterov):
    g ← g + λ p;   buf ← g (first step) | μ buf + g;   p ← p - η buf
AdamW (torch.optim.AdamW, decoupled weight decay, Loshchilov & Hutter 2019):
    p ← p (1 - η λ);   m ← β₁ m + (1 - β₁) g;   v ← β₂ v + (1 - β₂) g²
    p ← p - (η / (1 - β₁ᵗ)) · m / (√v / √(1 - β₂ᵗ) + ε)
LoraFAAdamW (the update of PEFT's LoraFAOptimizer, peft/optimizers/lorafa.py): the same moments, then
    p ← p - η √(1 - β₂ᵗ)/(1 - β₁ᵗ) · m / (√v + ε);   p ← p - η λ p   (weight decay AFTER the update)
Clipping (torch.nn.utils.clip_grad_norm_): n = ‖(g₁, …, g_k)‖₂; if n > max: g ← g · max/(n + 1e-6).
Schedules (transformers.get_linear_schedule_with_warmup / get_cosine_schedule_with_warmup):
    η(s) = η₀ · s/w for s < w; then linear: max(0, (S - s)/(S - w)), cosine: ½(1 + cos(π (s - w)/(S - w))).

Every optimiser and schedule has ``state_dict()`` / ``load_state_dict()``: a flat dict of arrays
(host copies) and JSON-able scalars, enough for a bit-exact resume.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import get_xp, host_scalar, to_host
from .module import Module


def _collect(model_or_params) -> list[tuple[str, Module, str]]:
    if isinstance(model_or_params, Module):
        triples = list(model_or_params.named_parameters(trainable_only=True))
    else:
        triples = list(model_or_params)
        for t in triples:
            if not (isinstance(t, tuple) and len(t) == 3 and isinstance(t[1], Module) and t[2] in t[1].params):
                raise ValueError(f"params must be (name, module, key) triples with key in module.params, got {t!r:.120}")
    names = [n for n, _, _ in triples]
    if len(set(names)) != len(names):
        raise ValueError("params: parameter names must be unique")
    return triples


def _nonneg(name: str, value, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (strict and value == 0):
        raise ValueError(f"{name} must be a finite {'positive' if strict else 'non-negative'} number, got {value!r}")
    return float(value)


class Optimizer:
    """What SGD and AdamW share: the parameter list, ``lr``, ``zero_grad`` and state I/O."""

    hyper: tuple[str, ...] = ("lr",)
    slots: tuple[str, ...] = ()

    def __init__(self, model_or_params, lr: float):
        self.params = _collect(model_or_params)
        self.lr = _nonneg("lr", lr)
        self.state: dict[str, dict] = {}  # name -> slot -> array
        self.step_count = 0

    def zero_grad(self) -> None:
        for _, m, k in self.params:
            g = m.grads.get(k)
            if g is not None:
                g[...] = 0

    def _grads(self):
        """(name, param, grad) for every parameter that has a gradient."""
        for name, m, k in self.params:
            g = m.grads.get(k)
            if g is not None:
                yield name, m.params[k], g

    def state_dict(self) -> dict:
        d = {h: getattr(self, h) for h in self.hyper}
        d["betas"] = list(d["betas"]) if "betas" in d else None
        d = {k: v for k, v in d.items() if v is not None}
        d["step"] = self.step_count
        for name, slots in self.state.items():
            for slot, a in slots.items():
                d[f"state.{name}.{slot}"] = np.array(to_host(a), copy=True)
        return d

    def load_state_dict(self, d: dict) -> None:
        """Restore from :meth:`state_dict`; every array is validated before anything is changed."""
        names = {n: m.params[k] for n, m, k in self.params}
        new_state: dict[str, dict] = {}
        for key, value in d.items():
            if not key.startswith("state."):
                continue
            name, _, slot = key[len("state."):].rpartition(".")
            if name not in names:
                raise ValueError(f"optimizer state {key!r}: no parameter {name!r} in this optimizer")
            if slot not in self.slots:
                raise ValueError(f"optimizer state {key!r}: unknown slot {slot!r}; expected one of {self.slots}")
            if tuple(np.shape(value)) != tuple(names[name].shape):
                raise ValueError(f"optimizer state {key!r}: shape {tuple(np.shape(value))}, expected {tuple(names[name].shape)}")
            p = names[name]
            xp = get_xp(p)
            new_state.setdefault(name, {})[slot] = xp.asarray(np.asarray(value), dtype=p.dtype).copy()
        for h in self.hyper:
            if h not in d:
                raise ValueError(f"optimizer state_dict is missing {h!r}")
        if "step" not in d:
            raise ValueError("optimizer state_dict is missing 'step'")
        for h in self.hyper:
            setattr(self, h, tuple(d[h]) if h == "betas" else float(d[h]))
        self.step_count = int(d["step"])
        self.state = new_state


class SGD(Optimizer):
    """torch.optim.SGD: momentum μ (buffer starts as the first gradient), weight decay λ (coupled)."""

    hyper = ("lr", "momentum", "weight_decay")
    slots = ("momentum_buffer",)

    def __init__(self, model_or_params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(model_or_params, lr)
        self.momentum = _nonneg("momentum", momentum)
        self.weight_decay = _nonneg("weight_decay", weight_decay)

    def step(self) -> None:
        self.step_count += 1
        for name, p, g in self._grads():
            d = g
            if self.weight_decay:
                d = g + self.weight_decay * p  # g ← g + λ p (not in place: grads are the caller's)
            if self.momentum:
                st = self.state.setdefault(name, {})
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = d.copy()  # buf ← g on the first step
                else:
                    buf *= self.momentum
                    buf += d  # buf ← μ buf + g
                d = buf
            p -= self.lr * d


class AdamW(Optimizer):
    """torch.optim.AdamW (amsgrad off): decoupled weight decay, bias-corrected moments."""

    hyper = ("lr", "betas", "eps", "weight_decay")
    slots = ("exp_avg", "exp_avg_sq")

    def __init__(self, model_or_params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(model_or_params, lr)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = _nonneg("eps", eps)
        self.weight_decay = _nonneg("weight_decay", weight_decay)

    def step(self) -> None:
        self.step_count += 1
        t = self.step_count
        b1, b2 = self.betas
        lr, eps, wd = self.lr, self.eps, self.weight_decay
        bc1 = 1.0 - b1 ** t
        bc2_sqrt = math.sqrt(1.0 - b2 ** t)
        step_size = lr / bc1
        for name, p, g in self._grads():
            xp = get_xp(p)
            if wd:
                p *= 1.0 - lr * wd  # p ← p (1 - η λ), decoupled from the gradient
            m, tmp = self._moments(name, p, g)
            xp.sqrt(self.state[name]["exp_avg_sq"], out=tmp)
            tmp /= bc2_sqrt
            tmp += eps  # denom = √v / √(1 - β₂ᵗ) + ε
            xp.divide(m, tmp, out=tmp)
            tmp *= step_size
            p -= tmp  # p ← p - η/(1 - β₁ᵗ) · m / denom

    def _moments(self, name: str, p, g):
        """m ← β₁ m + (1 - β₁) g;  v ← β₂ v + (1 - β₂) g² (state created as zeros on the first step);
        returns m and a scratch array of p's shape."""
        xp = get_xp(p)
        st = self.state.get(name)
        if st is None:
            st = self.state[name] = {"exp_avg": xp.zeros_like(p), "exp_avg_sq": xp.zeros_like(p)}
        b1, b2 = self.betas
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m *= b1
        m += (1.0 - b1) * g  # m ← β₁ m + (1 - β₁) g
        v *= b2
        tmp = g * g
        tmp *= 1.0 - b2
        v += tmp  # v ← β₂ v + (1 - β₂) g²
        return m, tmp


class LoraFAAdamW(AdamW):
    """The update rule of PEFT's LoraFAOptimizer (``peft/optimizers/lorafa.py``; PEFT's defaults
    eps 1e-6, weight decay 0): Adam with ε added to √v and the bias corrections folded into the step
    size, and the weight decay applied AFTER the update, to the updated parameter:

        p ← p - η √(1 - β₂ᵗ)/(1 - β₁ᵗ) · m / (√v + ε)      (correct_bias=False: η · m / (√v + ε))
        p ← p - η λ p

    PEFT's optimizer also replaces LoRA-FA's g_B by the corrected gradient; here
    ``adapters.lorafa.LoraFAController`` does that in after_backward, after the Trainer clips, which
    is where PEFT's optimizer sees the gradient (``adapters.lorafa.lorafa_optimizer`` builds this).
    """

    def __init__(self, model_or_params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True):
        super().__init__(model_or_params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if not isinstance(correct_bias, bool):
            raise ValueError(f"correct_bias must be a bool, got {correct_bias!r}")
        self.correct_bias = correct_bias

    def step(self) -> None:
        self.step_count += 1
        t = self.step_count
        b1, b2 = self.betas
        lr, eps, wd = self.lr, self.eps, self.weight_decay
        step_size = lr * math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t) if self.correct_bias else lr
        for name, p, g in self._grads():
            xp = get_xp(p)
            m, tmp = self._moments(name, p, g)
            xp.sqrt(self.state[name]["exp_avg_sq"], out=tmp)
            tmp += eps  # denom = √v + ε
            xp.divide(m, tmp, out=tmp)
            tmp *= step_size
            p -= tmp  # p ← p - η √(1 - β₂ᵗ)/(1 - β₁ᵗ) · m / denom
            if wd:
                p += (-lr * wd) * p  # p ← p - η λ p, on the updated p (PEFT: p.add_(p, alpha=-η λ))


def clip_grad_norm(model_or_params, max_norm: float) -> float:
    """Scale every gradient by max_norm / (n + 1e-6) when the global L2 norm n exceeds max_norm
    (torch.nn.utils.clip_grad_norm_). Returns n, the norm before clipping."""
    max_norm = _nonneg("max_norm", max_norm, strict=True)
    grads = [m.grads[k] for _, m, k in _collect(model_or_params) if k in m.grads]
    if not grads:
        return 0.0
    # ‖g‖² as dot products summed in float64 on the device, then one read
    total2 = sum((g.reshape(-1) @ g.reshape(-1)).astype(np.float64) for g in grads)
    total = math.sqrt(host_scalar(total2, "clip norm"))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g *= coef
    return total


class _Schedule:
    """A multiplicative schedule η(s) = η₀ · λ(s), stepped after each optimiser step (LambdaLR)."""

    def __init__(self, optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int):
        for name, v in (("num_warmup_steps", num_warmup_steps), ("num_training_steps", num_training_steps)):
            if type(v) is not int or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if num_training_steps < num_warmup_steps:
            raise ValueError(f"num_training_steps = {num_training_steps} must be >= num_warmup_steps = {num_warmup_steps}")
        self.optimizer = optimizer
        self.num_warmup_steps = num_warmup_steps
        self.num_training_steps = num_training_steps
        self.base_lr = optimizer.lr
        self.last_step = 0
        optimizer.lr = self.base_lr * self.factor(0)

    def factor(self, s: int) -> float:
        raise NotImplementedError

    def _warmup(self, s: int):
        return float(s) / float(max(1, self.num_warmup_steps))

    def _progress(self, s: int) -> float:
        return float(s - self.num_warmup_steps) / float(max(1, self.num_training_steps - self.num_warmup_steps))

    @property
    def lr(self) -> float:
        return self.optimizer.lr

    def step(self) -> None:
        self.last_step += 1
        self.optimizer.lr = self.base_lr * self.factor(self.last_step)

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "last_step": self.last_step, "num_warmup_steps": self.num_warmup_steps,
                "num_training_steps": self.num_training_steps}

    def load_state_dict(self, d: dict) -> None:
        for k in ("base_lr", "last_step", "num_warmup_steps", "num_training_steps"):
            if k not in d:
                raise ValueError(f"schedule state_dict is missing {k!r}")
        self.base_lr = float(d["base_lr"])
        self.last_step = int(d["last_step"])
        self.num_warmup_steps = int(d["num_warmup_steps"])
        self.num_training_steps = int(d["num_training_steps"])
        self.optimizer.lr = self.base_lr * self.factor(self.last_step)


class LinearWarmupLinearDecay(_Schedule):
    """transformers.get_linear_schedule_with_warmup: 0 -> η₀ over w steps, then linearly to 0 at S."""

    def factor(self, s: int) -> float:
        if s < self.num_warmup_steps:
            return self._warmup(s)
        return max(0.0, float(self.num_training_steps - s) / float(max(1, self.num_training_steps - self.num_warmup_steps)))


class LinearWarmupCosineDecay(_Schedule):
    """transformers.get_cosine_schedule_with_warmup (num_cycles 0.5): warm-up, then a half cosine to 0."""

    def factor(self, s: int) -> float:
        if s < self.num_warmup_steps:
            return self._warmup(s)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * 0.5 * self._progress(s))))


def make_adamw(model, lr: float, weight_decay: float, total_steps: int):
    """AdamW (betas 0.9, 0.999, eps 1e-8) with a linear warm-up over 5% of the steps, then a half
    cosine to 0 (transformers' get_cosine_schedule_with_warmup): (optimizer, schedule)."""
    opt = AdamW(model, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    sched = LinearWarmupCosineDecay(opt, num_warmup_steps=max(1, total_steps // 20), num_training_steps=total_steps)
    return opt, sched
