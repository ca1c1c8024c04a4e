"""Layer objects: the one convention every part of the engine follows.

A layer is a :class:`Module`:

- ``params``:  name -> array, the layer's own parameters (names match Hugging Face / PEFT keys);
- ``grads``:   name -> array, same names and shapes; gradients ACCUMULATE with ``+=`` and are
  zeroed explicitly by :meth:`Module.zero_grad` (as in llm.c), so a parameter used twice
  (GPT-2's tied embedding) sums its gradients naturally;
- ``frozen``:  the names of parameters that get no gradient (their backward work is skipped);
- ``forward(x) -> y`` computes the output and keeps in ``self.cache`` only what ``backward``
  needs; ``backward(dy) -> dx`` consumes that cache, accumulates into ``grads`` and returns the
  gradient with respect to the input. One forward is followed by at most one backward.

Stateless mathematics (the forward/backward pairs) lives in :mod:`spectral_peft.ops` as functions
``op_forward(...) -> (out, cache)`` and ``op_backward(dout, cache) -> grads``; modules hold
parameters and call those pairs.

Sub-layers are found from the attributes that hold a Module (in assignment order), so the dotted
path of a parameter is its Hugging Face key, e.g. ``transformer.h.0.attn.c_attn.weight``.

Shape legend: N tokens (B·T flattened, or any leading dims), d_in, d_out.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from .backend import get_xp
from .ops.linear import linear_backward, linear_forward


class Module:
    """Base class of every layer (see the module docstring for the contract)."""

    def __init__(self):
        self.params: dict = {}
        self.grads: dict = {}
        self.frozen: set[str] = set()
        self.training: bool = True
        self.cache = None

    # --- tree ---------------------------------------------------------------------------------
    def children(self) -> Iterator[tuple[str, Module]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, child in self.children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def get_submodule(self, path: str) -> Module:
        module = self
        for part in path.split(".") if path else []:
            children = dict(module.children())
            if part not in children:
                raise KeyError(f"no submodule {part!r} in {path!r}; children here: {sorted(children)}")
            module = children[part]
        return module

    def set_submodule(self, path: str, new: Module) -> None:
        parent_path, _, name = path.rpartition(".")
        parent = self.get_submodule(parent_path)
        if isinstance(parent, ModuleList):
            parent.items[int(name)] = new
        else:
            if not isinstance(getattr(parent, name, None), Module):
                raise KeyError(f"{path!r} is not a submodule")
            setattr(parent, name, new)

    def named_parameters(self, prefix: str = "", trainable_only: bool = False):
        """Yield (dotted name, owning module, key in module.params) for every parameter, once.

        A parameter array shared by two modules (a tied weight) is yielded only the first time.
        """
        seen: set[int] = set()
        for mod_name, module in self.named_modules(prefix):
            for key, value in module.params.items():
                if id(value) in seen:
                    continue
                seen.add(id(value))
                if trainable_only and key in module.frozen:
                    continue
                yield (f"{mod_name}.{key}" if mod_name else key), module, key

    def state_dict(self) -> dict:
        """Dotted name -> parameter array (the live arrays, not copies)."""
        return {name: m.params[k] for name, m, k in self.named_parameters()}

    def trainable_state(self) -> dict:
        return {name: m.params[k] for name, m, k in self.named_parameters(trainable_only=True)}

    def num_parameters(self, trainable_only: bool = False) -> int:
        return int(sum(m.params[k].size for _, m, k in self.named_parameters(trainable_only=trainable_only)))

    # --- modes and gradients -------------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        for _, m in self.named_modules():
            m.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def freeze(self, *names: str) -> None:
        """Freeze this module's own parameters ``names`` (all of them when none are given)."""
        for n in names or tuple(self.params):
            if n not in self.params:
                raise KeyError(f"{type(self).__name__} has no parameter {n!r}; it has {sorted(self.params)}")
            self.frozen.add(n)
            self.grads.pop(n, None)

    def unfreeze(self, *names: str) -> None:
        for n in names or tuple(self.params):
            self.frozen.discard(n)

    def freeze_all(self) -> None:
        for _, m in self.named_modules():
            m.freeze()

    def zero_grad(self) -> None:
        """Set every trainable gradient to zero (allocating it on first use)."""
        for _, m in self.named_modules():
            for k, p in m.params.items():
                if k in m.frozen:
                    continue
                g = m.grads.get(k)
                if g is None or g.shape != p.shape or g.dtype != p.dtype:
                    m.grads[k] = get_xp(p).zeros_like(p)
                else:
                    g[...] = 0

    def accumulate(self, key: str, value) -> None:
        """grads[key] += value, allocating on first use (so zero_grad is optional before step 1)."""
        g = self.grads.get(key)
        if g is None:
            self.grads[key] = value.astype(self.params[key].dtype, copy=True)
        else:
            g += value

    def named_grads(self) -> dict:
        """Dotted name -> gradient array, for every trainable parameter that has one."""
        out = {}
        for name, m, k in self.named_parameters(trainable_only=True):
            if k in m.grads:
                out[name] = m.grads[k]
        return out

    # --- memory accounting ---------------------------------------------------------------------
    def activation_bytes(self) -> int:
        """Bytes of the arrays held in the caches of this module tree (each array counted once)."""
        seen: set[int] = set()
        total = 0
        for _, m in self.named_modules():
            for a in iter_arrays(m.cache):
                if id(a) not in seen:
                    seen.add(id(a))
                    total += int(a.nbytes)
        return total

    def clear_cache(self) -> None:
        for _, m in self.named_modules():
            m.cache = None

    # --- the layer contract --------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


def iter_arrays(obj) -> Iterator:
    """Every ndarray-like object reachable through tuples, lists and dicts of ``obj``."""
    if obj is None:
        return
    if hasattr(obj, "nbytes") and hasattr(obj, "shape"):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_arrays(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from iter_arrays(v)


class ModuleList(Module):
    """An indexed list of modules; children are named "0", "1", ... as in PyTorch."""

    def __init__(self, items):
        super().__init__()
        self.items = list(items)

    def children(self):
        for i, m in enumerate(self.items):
            yield str(i), m

    def __getitem__(self, i):
        return self.items[i]

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


class Linear(Module):
    """y = x Wᵀ + b.

    x: (..., d_in) -> y: (..., d_out); W ``params["weight"]``: (d_out, d_in), PyTorch's layout
    (GPT-2's Conv1D (d_in, d_out) weights are transposed by the loader); b ``params["bias"]``:
    (d_out,) or absent.

    The forward caches x only when W is trainable: dX = dY W needs W alone, so a frozen linear
    (the base of every adapter) keeps no activations of its own, skips the dW product, and (its
    bias frozen too) the bias sum over dY.
    """

    def __init__(self, weight, bias=None):
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"Linear weight must be 2-D (d_out, d_in), got shape {weight.shape}")
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"Linear bias must have shape ({weight.shape[0]},), got {bias.shape}")
        self.params["weight"] = weight
        if bias is not None:
            self.params["bias"] = bias

    @property
    def d_in(self) -> int:
        return self.params["weight"].shape[1]

    @property
    def d_out(self) -> int:
        return self.params["weight"].shape[0]

    @property
    def dtype(self):
        """The compute dtype of inputs and outputs (a quantised subclass answers without dequantising)."""
        return self.params["weight"].dtype

    @property
    def xp(self):
        """The array namespace the layer computes in (numpy or cupy)."""
        return get_xp(self.params["weight"])

    def effective_weight(self):
        """The dense (d_out, d_in) matrix this layer applies (a quantised base dequantises here)."""
        return self.params["weight"]

    def forward(self, x):
        if x.shape[-1] != self.d_in:
            raise ValueError(f"Linear expects inputs (..., {self.d_in}), got {x.shape}")
        y, self.cache = linear_forward(x, self.params["weight"], self.params.get("bias"),
                                       keep_x="weight" not in self.frozen)
        return y

    def backward(self, dy):
        need_dW = "weight" not in self.frozen
        g = self.grads.get("weight") if need_dW else None
        if g is not None and (g.shape != self.params["weight"].shape or g.dtype != self.params["weight"].dtype):
            g = None
        # grads["weight"] += dYᵀ x is taken by one in-place gemm once the accumulator exists
        dx, dW, db = linear_backward(dy, self.cache, self.effective_weight(), need_dW=need_dW,
                                     need_db="bias" not in self.frozen, dW_out=g)
        if dW is not None and g is None:
            self.accumulate("weight", dW)
        if db is not None:
            self.accumulate("bias", db)
        self.cache = None
        return dx


# ------------------------------------------------------------------------------------------------
# Choosing linears by name (PEFT's target_modules rule)
# ------------------------------------------------------------------------------------------------
def linear_paths(model: Module) -> list[str]:
    """Dotted paths of every Linear (dense or quantised) in ``model``."""
    return [name for name, m in model.named_modules() if isinstance(m, Linear)]


def match_target_modules(model: Module, target_modules: str | Sequence[str]) -> list[str]:
    """The Linear paths chosen by ``target_modules``, following PEFT's rule.

    A string is a regular expression matched against the whole path (``re.fullmatch``). A list
    matches a path equal to an entry or ending with ``"." + entry``. Every list entry must match
    something, otherwise a ValueError lists the linear names that exist.
    """
    paths = linear_paths(model)
    leaf_names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    if isinstance(target_modules, str):
        chosen = [p for p in paths if re.fullmatch(target_modules, p)]
        if not chosen:
            raise ValueError(
                f"target_modules regex {target_modules!r} matches no linear layer; "
                f"linear layers are named {leaf_names} (e.g. {paths[:3]})")
        return chosen
    if not target_modules:
        raise ValueError("target_modules is empty; name at least one of " + str(leaf_names))
    missing = [t for t in target_modules if not any(p == t or p.endswith("." + t) for p in paths)]
    if missing:
        raise ValueError(f"target_modules {missing} match no linear layer; the linear layers are named {leaf_names}")
    return [p for p in paths if any(p == t or p.endswith("." + t) for t in target_modules)]
