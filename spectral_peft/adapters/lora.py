"""LoRA (and rsLoRA): a frozen linear plus a trainable low-rank update, as PEFT defines it.

Hu et al. 2021; facts from PEFT 0.21.2 ``peft/tuners/lora/{layer,config,model}.py`` (spectral_peft's
ALGORITHMS.md, LoRA section). docs/lora.md derives every line below.

Shape legend: N tokens (B·T, or any leading dims), d_in, d_out, r the rank.

    lora_A.weight  A (r, d_in)     lora_B.weight  B (d_out, r)
    y = base(x) + s · (drop(x) Aᵀ) Bᵀ             s = lora_alpha / r   (rsLoRA: lora_alpha / √r)
    trainable parameters per adapted linear: r · (d_in + d_out)

Init (PEFT's ``init_lora_weights``): True -> A ~ U(-1/√d_in, 1/√d_in) (kaiming_uniform, a=√5), B = 0,
so the adapted model starts equal to the base; "gaussian" -> A ~ N(0, std = 1/r), B = 0; False ->
both as nn.Linear's default (A ~ U(-1/√d_in, 1/√d_in), B ~ U(-1/√r, 1/√r)), a non-zero start that
tests use. Every draw comes from the host generator handed to ``make_layer``. The inits that read
the base weight ("pissa", "pissa_niter_N", "olora", "loftq") live in lora_init.py: they set A and B
from a decomposition of W and replace the frozen base by the residual (or, LoftQ, by its 4-bit Q).

fan_in_fan_out: GPT-2 stores its projections as Conv1D weights (d_in, d_out). The engine's Linear
is always (d_out, d_in) (the model loader transposes), so the flag changes nothing here: the
delta s·B A is added to a (d_out, d_in) weight. It is kept in the config so that PEFT, which merges
into Conv1D storage, reads the file correctly (PEFT forces it to True for Conv1D targets).

How the products are taken (the same y and dx, docs/performance.md "Frozen base"): on a frozen
dense base in float32 NumPy the branch never forms an (N, d_out) or (N, d_in) temporary. Where
d_out > d_in the forward is one GEMM y = [x | xa | 1] @ [Wᵀ; s·Bᵀ; b]; otherwise [xa | 1] [s·Bᵀ; b]
with x Wᵀ accumulated onto it. Where d_out < d_in (and no dropout) the backward's dx is one GEMM
[dY | s·dY B] @ [W; A]; otherwise dY W with dxa A accumulated onto it. The stacked buffers hold
the frozen W itself (the base's weight becomes a view of them). Elsewhere (float64, the device,
quantised or pruned bases) y = base(x), then the branch added in place.

The layer family: :class:`LoraLinear` (here); DoRA (dora.py), DyLoRA (dylora.py), LoRA-FA
(lorafa.py) and Delta-LoRA (deltalora.py) subclass it and its config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

import numpy as np

from .. import validation as V
from ..backend import to_host
from ..module import Linear, Module
from ..ops.dropout import dropout_backward, dropout_forward
from ..ops.linear import fast_gemm_available, linear_forward
from ..ops.lowrank import lowrank_backward, lowrank_forward, lowrank_stacked_backward, lowrank_stacked_forward
from .base import AdapterConfig, AdapterLayer, Recipe, adapter_layers, pattern_value
from .lora_init import check_loftq_config, residual_init, residual_kind

A_KEY = "lora_A.weight"  # PEFT's file-key suffixes (the adapter name dropped)
B_KEY = "lora_B.weight"

# PEFT LoraConfig fields written to / read from adapter_config.json (engine options are not).
PEFT_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "fan_in_fan_out", "use_rslora",
               "use_dora", "init_lora_weights", "bias", "rank_pattern", "alpha_pattern",
               "modules_to_save", "task_type", "loftq_config")


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """s = lora_alpha / r, or lora_alpha / √r with rsLoRA (PEFT LoraLayer.update_layer)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def init_lora_arrays(rng, r: int, d_in: int, d_out: int, init_lora_weights):
    """Host float64 A (r, d_in), B (d_out, r) drawn as PEFT initialises them (module docstring).

    A is always drawn first, then B (zeros need no draw), so the stream order is fixed."""
    bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform(a=√5) on (r, d_in): gain √(2/(1+5)) · √(3/d_in)
    if init_lora_weights == "gaussian":
        A = rng.normal(0.0, 1.0 / r, size=(r, d_in))  # PEFT: nn.init.normal_(std=1/r)
    else:
        A = rng.uniform(-bound, bound, size=(r, d_in))
    if init_lora_weights is False:
        b = 1.0 / math.sqrt(r)  # nn.Linear(r, d_out)'s default init
        B = rng.uniform(-b, b, size=(d_out, r))
    else:
        B = np.zeros((d_out, r))
    return A, B


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
@dataclass
class LoraConfig(AdapterConfig):
    """LoRA's hyper-parameters under PEFT's field names and defaults (peft LoraConfig).

    Validated at construction; errors name the field, its value and what would be right. The
    variants (DyLoRA, LoRA-FA, Delta-LoRA) subclass this config and are written to
    adapter_config.json as plain PEFT LoRA (their file format is LoRA's).
    """

    peft_type: ClassVar[str] = "LORA"

    r: int = 8  # rank of every adapted linear (rank_pattern overrides per module)
    lora_alpha: float = 8  # scaling numerator: s = lora_alpha / r
    lora_dropout: float = 0.0  # dropout on the branch input only
    target_modules: str | list[str] | None = None  # required: names or a regex (PEFT's rule)
    fan_in_fan_out: bool = False  # True for GPT-2's Conv1D storage (file format only, see module docstring)
    use_rslora: bool = False  # s = lora_alpha / √r
    use_dora: bool = False  # DoRA (dora.py): magnitude vector and detached norm
    init_lora_weights: bool | str = True  # True: kaiming-uniform A, B = 0; "gaussian"; False: both random;
    #   "pissa", "pissa_niter_N", "olora", "loftq": from the base weight, which becomes the residual (lora_init.py)
    bias: str = "none"  # only "none" is supported
    rank_pattern: dict = field(default_factory=dict)  # {module regex: r}
    alpha_pattern: dict = field(default_factory=dict)  # {module regex: lora_alpha}
    modules_to_save: list[str] | None = None  # non-adapted modules trained in full and saved (PEFT's rule: modules_to_save_paths)
    task_type: str | None = None  # PEFT's task type, carried through the file
    loftq_config: dict = field(default_factory=dict)  # {"loftq_bits": 4, "loftq_iter": n} with init "loftq"

    def __post_init__(self):
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if self.rank_pattern is None:
            self.rank_pattern = {}
        if self.alpha_pattern is None:
            self.alpha_pattern = {}
        if self.loftq_config is None:
            self.loftq_config = {}
        self.validate()
        self.rank_pattern = dict(self.rank_pattern)
        self.alpha_pattern = dict(self.alpha_pattern)

    def validate(self) -> None:
        n = self.name
        self.check_target_modules()
        V.check_int(n, "r", self.r, min=0, min_inclusive=False)
        V.check_float(n, "lora_alpha", self.lora_alpha, min=0, min_inclusive=False)
        V.check_float(n, "lora_dropout", self.lora_dropout, min=0, max=1, max_inclusive=False, noun="a float")
        V.check_bool(n, "fan_in_fan_out", self.fan_in_fan_out)
        V.check_bool(n, "use_rslora", self.use_rslora)
        V.check_bool(n, "use_dora", self.use_dora)
        try:
            residual_kind(self.init_lora_weights)
        except ValueError as exc:
            raise ValueError(f"{n}.{exc}") from None
        check_loftq_config(n, self.init_lora_weights, self.loftq_config)
        if self.bias != "none":
            raise ValueError(f"{n}.bias={self.bias!r} is not supported; use 'none'")
        V.check_str_list(n, "modules_to_save", self.modules_to_save, allow_none=True)
        if self.modules_to_save is not None and not all(self.modules_to_save):
            raise ValueError(f"{n}.modules_to_save={self.modules_to_save!r} holds an empty name; name modules, "
                             "e.g. ['wpe', 'ln_f'], or pass None")
        V.check_mapping(n, "rank_pattern", self.rank_pattern, str,
                        lambda o, k, v: V.check_int(o, k, v, min=0, min_inclusive=False))
        V.check_mapping(n, "alpha_pattern", self.alpha_pattern, str,
                        lambda o, k, v: V.check_float(o, k, v, min=0, min_inclusive=False))
        V.check_optional_str(n, "task_type", self.task_type)

    # --- per-module values ------------------------------------------------------------------------
    def rank_for(self, path: str) -> int:
        """r of the linear at ``path`` (rank_pattern, PEFT's matching rule, else r)."""
        return int(pattern_value(self.rank_pattern, path, self.r))

    def alpha_for(self, path: str) -> float:
        return pattern_value(self.alpha_pattern, path, self.lora_alpha)

    def layer_kwargs(self, path: str, base: Linear, rng) -> dict:
        return dict(r=self.rank_for(path), lora_alpha=self.alpha_for(path), lora_dropout=self.lora_dropout,
                    use_rslora=self.use_rslora, init_lora_weights=self.init_lora_weights, rng=rng,
                    fan_in_fan_out=self.fan_in_fan_out, path=path, loftq_config=self.loftq_config)

    # --- AdapterConfig protocol ---------------------------------------------------------------------
    def make_layer(self, path: str, base: Linear, rng) -> Module:
        if self.use_dora:  # the registry resolves LoraConfig(use_dora=True) to dora.DoraConfig
            raise ValueError(f"{self.name}(use_dora=True) builds DoRA layers through the registry: use "
                             "get_peft_model, or spectral_peft.adapters.registry.resolve(config) first")
        return LoraLinear(base, **self.layer_kwargs(path, base, rng))

    def layer_parameter_count(self, r: int, d_out: int, d_in: int) -> int:
        """Trainable entries of one adapted (d_out, d_in) linear at rank r: A and B."""
        return r * (d_in + d_out)

    def parameter_count(self, shapes: dict[str, tuple[int, int]]) -> int:
        """Σ over the adapted linears of r_path · (d_in + d_out) (the variants change the summand)."""
        return int(sum(self.layer_parameter_count(self.rank_for(p), d_out, d_in) for p, (d_out, d_in) in shapes.items()))

    @classmethod
    def for_run(cls, options, size, **fields_) -> LoraConfig:
        """The config the main job trains at budget knob ``size``: r, or (r, rank_pattern) when some
        modules take r + 1 to meet the budget; ``options`` gives alpha, dropout and the targets."""
        r, pattern = size if isinstance(size, tuple) else (size, None)
        kwargs = dict(r=r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                      target_modules=options.target_list(), rank_pattern=dict(pattern or {}))
        kwargs.update(fields_)
        return cls(**kwargs)

    def to_json_dict(self, peft_model=None) -> dict:
        """adapter_config.json with PEFT's LoraConfig fields. fan_in_fan_out is written True for a
        GPT-2 base, as PEFT sets it for Conv1D targets."""
        tm = self.target_modules
        fifo = self.fan_in_fan_out
        if peft_model is not None and getattr(getattr(peft_model.model, "config", None), "model_type", None) == "gpt2":
            fifo = True
        return {
            "peft_type": "LORA", "task_type": self.task_type, "inference_mode": True,
            "base_model_name_or_path": None, "revision": None,
            "r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
            "target_modules": tm if isinstance(tm, str) else list(tm),
            "fan_in_fan_out": fifo, "use_rslora": self.use_rslora, "use_dora": self.use_dora,
            "init_lora_weights": self.init_lora_weights, "bias": self.bias,
            "rank_pattern": dict(self.rank_pattern), "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": self.modules_to_save, "layers_to_transform": None, "layers_pattern": None,
            "loftq_config": dict(self.loftq_config),
        }

    # --- PiSSA / OLoRA back to plain LoRA (PEFT's path_initial_model_for_weight_conversion) -----------
    def initial_config(self) -> LoraConfig:
        """This config with init_lora_weights=True: what PEFT writes beside the initial adapter, so
        that loading it does not decompose the base a second time."""
        return replace(self, init_lora_weights=True, loftq_config={})

    def weight_conversion(self, arrays: dict, initial: dict) -> tuple[LoraConfig, dict]:
        """A trained adapter whose base was replaced by W_res = W − s·B₀A₀, as a plain rank-2r LoRA
        for the ORIGINAL W (PEFT's LoraModel.subtract_mutated_init):

            W_res + s·B A = W + s·(B A − B₀ A₀) = W + s'·B' A',   A' = [A; A₀] (2r, d_in),
            B' = [B, −B₀] (d_out, 2r),  s' = s  (r' = 2r, lora_alpha' = 2·lora_alpha, or √2·lora_alpha
            with rsLoRA; rank_pattern and alpha_pattern doubled).

        arrays, initial: {file key: host array} of the trained and of the initial adapter (the same
        keys and shapes). Returns the converted config (init_lora_weights=True) and arrays."""
        n = self.name
        if self.use_dora:
            raise ValueError(f"{n}(use_dora=True): a DoRA adapter has no plain-LoRA form (its magnitude "
                             "multiplies the whole weight); save it without path_initial_model_for_weight_conversion")
        if self.init_lora_weights == "loftq":
            raise ValueError(f"{n}.init_lora_weights='loftq': the base is the 4-bit Q, not W − s·B₀A₀, so "
                             "B A − B₀ A₀ on the original W does not give the trained model")
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern):  # PEFT refuses the same
            raise ValueError(f"{n}: path_initial_model_for_weight_conversion is not supported with use_rslora=True "
                             "and a rank_pattern or alpha_pattern")
        differ = sorted(set(arrays) ^ set(initial))
        if differ:
            raise ValueError(f"the initial adapter and the trained one hold different keys, e.g. {differ[0]!r}")
        out = {}
        for key, a in arrays.items():
            a0 = np.asarray(initial[key], dtype=a.dtype)
            if a0.shape != a.shape:
                raise ValueError(f"{key}: initial shape {a0.shape}, trained {a.shape}")
            if key.endswith(A_KEY):
                out[key] = np.concatenate([a, a0], axis=0)  # A' = [A; A₀]  (2r, d_in)
            elif key.endswith(B_KEY):
                out[key] = np.concatenate([a, -a0], axis=1)  # B' = [B, −B₀]  (d_out, 2r)
            else:
                raise ValueError(f"{key}: only lora_A / lora_B tensors convert to plain LoRA")
        alpha = self.lora_alpha * (math.sqrt(2.0) if self.use_rslora else 2)
        converted = replace(self, init_lora_weights=True, loftq_config={}, r=2 * self.r, lora_alpha=alpha,
                            rank_pattern={k: 2 * v for k, v in self.rank_pattern.items()},
                            alpha_pattern={k: 2 * v for k, v in self.alpha_pattern.items()})
        return converted, out

    @classmethod
    def from_json_dict(cls, d: dict) -> LoraConfig:
        """Build from adapter_config.json: PEFT's LoRA fields are taken, others ignored; options the
        engine does not implement (layers_to_transform, lora_bias, ...) are refused by name."""
        if str(d.get("peft_type", "LORA")).upper() != "LORA":
            raise ValueError(f"adapter_config.json peft_type is {d.get('peft_type')!r}, expected 'LORA'")
        for key in ("layers_to_transform", "layers_pattern", "lora_bias", "use_qalora", "target_parameters",
                    "exclude_modules"):
            if d.get(key):
                raise ValueError(f"adapter_config.json {key}={d[key]!r} is not supported by spectral_peft")
        names = {f.name for f in fields(cls)} & set(PEFT_FIELDS)
        kwargs = {k: v for k, v in d.items() if k in names}
        if isinstance(kwargs.get("target_modules"), (list, tuple, set)):
            kwargs["target_modules"] = sorted(kwargs["target_modules"])
        return cls(**kwargs)


# ------------------------------------------------------------------------------------------------
# The layer
# ------------------------------------------------------------------------------------------------
class LoraLinear(AdapterLayer):
    """y = base(x) + s · (drop(x) Aᵀ) Bᵀ  (module docstring for shapes and init).

    x (..., d_in) -> y (..., d_out). Child ``base_layer`` (frozen Linear, dense or quantised);
    params ``lora_A.weight`` (r, d_in) and ``lora_B.weight`` (d_out, r).

    Cache: the low-rank cache (the branch input (..., d_in), only while A is trainable, and
    x Aᵀ (..., r)) and the dropout mask; the frozen base keeps nothing.
    Merged (``merge()``): the base weight holds W + s·B A and the forward is the base alone
    (inference; no adapter gradients), until ``unmerge()``.
    """

    _stacked_dx = False  # set by each forward: whether the backward takes dx by lowrank_stacked_backward

    def __init__(self, base: Linear, r: int, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True, rng=None,
                 fan_in_fan_out: bool = False, path: str = "", loftq_config: dict | None = None):
        where = f" (module {path!r})" if path else ""
        if not isinstance(base, Linear):
            raise TypeError(f"LoRA wraps a Linear{where}, got {type(base).__name__}")
        d_out, d_in = base.d_out, base.d_in
        # r > min(d_in, d_out) is allowed, as in PEFT: the update's rank is then min(d_in, d_out)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be an integer >= 1{where}, got r={r!r}")
        if not lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0{where}, got {lora_alpha!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1){where}, got {lora_dropout!r}")
        if rng is None:
            raise ValueError("LoRA needs rng, the host numpy Generator initial values are drawn from")
        try:
            reads_base = residual_kind(init_lora_weights) is not None
        except ValueError as exc:
            raise ValueError(f"{exc}{where}") from None
        loftq_config = check_loftq_config("LoraLinear", init_lora_weights, loftq_config)
        scaling = lora_scaling(r, lora_alpha, use_rslora)
        if reads_base:  # A, B from W; the frozen base becomes the residual (a new layer; ``base`` is untouched)
            A, B, base = residual_init(init_lora_weights, base, r, scaling, rng, loftq_config, where)
        else:
            A, B = init_lora_arrays(rng, r, d_in, d_out, init_lora_weights)
        super().__init__(base)
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = bool(use_rslora)
        self.scaling = scaling
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.lora_dropout = float(lora_dropout)
        xp, dtype = base.xp, base.dtype
        self.params[A_KEY] = xp.asarray(A.astype(dtype))
        self.params[B_KEY] = xp.asarray(B.astype(dtype))
        # the dropout stream is seeded from the host stream, then lives on the backend
        self.dropout_rng = self.make_dropout_rng(rng, lora_dropout)
        self.merged = False

    # --- sizes -------------------------------------------------------------------------------------
    def adapter_parameter_count(self) -> int:
        """r · (d_in + d_out): the trainable size of plain LoRA (docs/lora.md)."""
        return self.r * (self.d_in + self.d_out)

    def delta_weight(self):
        """ΔW = s · B A   (d_out, r) @ (r, d_in) -> (d_out, d_in)."""
        d = self.params[B_KEY] @ self.params[A_KEY]
        d *= self.scaling
        return d

    # --- forward / backward ------------------------------------------------------------------------
    def _check_input(self, x):
        if x.shape[-1] != self.d_in:
            raise ValueError(f"{type(self).__name__} expects inputs (..., {self.d_in}), got {x.shape}")

    def forward(self, x):
        self._check_input(x)
        if self.merged:
            return self.base_layer.forward(x)
        p = self.params
        base = self.base_layer
        xd, dcache = dropout_forward(x, self.lora_dropout, self.dropout_rng, self.training)
        keep_x = A_KEY not in self.frozen  # the branch's cache shares x (no copy) only while A is trainable
        # where d_out < d_in (and no dropout sits between x and the branch) the backward takes dx as one GEMM
        self._stacked_dx = False
        if type(base) is Linear and "weight" in base.frozen and isinstance(x, np.ndarray) \
                and isinstance(base.params["weight"], np.ndarray) and fast_gemm_available(x.dtype):
            self._stacked_dx = self.d_out < self.d_in and dcache is None
            bias = base.params.get("bias")
            if self.d_out > self.d_in:
                # y = [x | drop(x) Aᵀ | 1] @ [Wᵀ; s·Bᵀ; b]: one GEMM over the stacked weight (where d_out > d_in
                # it beats the two products below, docs/performance.md); W is a view of that weight
                y, lcache = lowrank_stacked_forward(x, xd, p[A_KEY], p[B_KEY], self.scaling, self._stacked_weight(),
                                                    keep_x=keep_x)
            else:
                # y = (s · (drop(x) Aᵀ) Bᵀ + b) + x Wᵀ: the small product first, the base's bias folded into it,
                # then the frozen base's product accumulated onto it by one gemm (no pass over y for either addition)
                y, lcache = lowrank_forward(xd, p[A_KEY], p[B_KEY], self.scaling, keep_x=keep_x, bias=bias)
                y, base.cache = linear_forward(x, base.params["weight"], None, keep_x=False, out=y)
            base.cache = (None, bias is not None)  # what the base's own forward keeps for a frozen W (no x)
        else:
            y = base.forward(x)  # (..., d_in) -> (..., d_out), a fresh array
            # y = base(x) + s · (drop(x) Aᵀ) Bᵀ: the branch accumulated into the base's output (no temporary)
            y, lcache = lowrank_forward(xd, p[A_KEY], p[B_KEY], self.scaling, keep_x=keep_x, out=y)
        self.cache = (lcache, dcache)
        return y

    def _stack_holding_weight(self, shape, weight_view):
        """A float buffer of ``shape`` of which ``weight_view(buffer)`` IS the frozen base weight: on first
        use W is copied in and the base's ``weight`` becomes that view (the same values), so W is not
        held twice and what changes it in place (merge, Delta-LoRA) changes the buffer. Should anything
        install another weight array, the buffer is rebuilt from it. A layer uses one layout only (its
        d_out > d_in or d_out < d_in decides which), so one buffer is kept."""
        base = self.base_layer
        W = base.params["weight"]
        S = getattr(self, "_stack", None)
        if S is None or W is not self._stack_view or S.shape != shape:
            S = np.empty(shape, dtype=W.dtype)
            weight_view(S)[...] = W
            self._stack = S
            self._stack_view = base.params["weight"] = weight_view(S)  # (d_out, d_in), a view of S
        return S

    def _stacked_weight(self):
        """V = [Wᵀ; s·Bᵀ; b] (d_in + r + 1, d_out) for :func:`lowrank_stacked_forward`: W is the view
        ``V[:d_in].T`` (F-ordered); the bias row is refreshed every call (d_out values), the s·Bᵀ rows
        are written by the forward itself."""
        V = self._stack_holding_weight((self.d_in + self.r + 1, self.d_out), lambda S: S[:self.d_in].T)
        bias = self.base_layer.params.get("bias")
        V[-1] = 0 if bias is None else bias
        return V

    def _stacked_input_weight(self):
        """U = [W; A] (d_out + r, d_in) for :func:`lowrank_stacked_backward`: W is the view ``U[:d_out]``
        (C-contiguous); the A rows are written by the backward itself."""
        return self._stack_holding_weight((self.d_out + self.r, self.d_in), lambda S: S[:self.d_out])

    def backward(self, dy):
        if self.merged:
            return self.base_layer.backward(dy)
        lcache, dcache = self.cache
        p = self.params
        if self._stacked_dx:
            # y = x Wᵀ + s · (x Aᵀ) Bᵀ  =>  dx = [dY | s·dY B] @ [W; A], one GEMM (the frozen base keeps nothing)
            dx, dA, dB = lowrank_stacked_backward(dy, lcache, p[A_KEY], p[B_KEY], self.scaling,
                                                  self._stacked_input_weight(), need_dA=A_KEY not in self.frozen,
                                                  need_dB=B_KEY not in self.frozen)
            self.base_layer.cache = None
        else:
            dx = self.base_layer.backward(dy)  # y = base(x)  =>  dx = base'(dy), a fresh array
            # branch input = drop(x)  =>  dx += drop'(dx_branch); without dropout the branch's dx_branch = dxa A
            # is accumulated into dx by one in-place gemm
            dx_b, dA, dB = lowrank_backward(dy, lcache, p[A_KEY], p[B_KEY], self.scaling,
                                            need_dA=A_KEY not in self.frozen, need_dB=B_KEY not in self.frozen,
                                            dx_out=dx if dcache is None else None)
            if dcache is not None:
                dx += dropout_backward(dx_b, dcache)
        if dA is not None:
            self.accumulate(A_KEY, dA)
        if dB is not None:
            self.accumulate(B_KEY, dB)
        self.cache = None
        return dx

    # --- adapter file ------------------------------------------------------------------------------
    def peft_state_dict(self) -> dict:
        """{suffix: array} as PEFT writes this layer into adapter_model.safetensors."""
        return {A_KEY: self.params[A_KEY], B_KEY: self.params[B_KEY]}

    def peft_shapes(self) -> dict:
        """{suffix: shape} of the arrays :meth:`load_peft_state_dict` needs."""
        return {k: tuple(v.shape) for k, v in self.peft_state_dict().items()}

    def load_peft_state_dict(self, arrays: dict) -> None:
        """Install arrays read from an adapter file (host or device; cast to the layer's dtype).
        Every key and shape is checked before anything is installed."""
        want = self.peft_shapes()
        missing = sorted(set(want) - set(arrays))
        if missing:
            raise KeyError(f"adapter arrays {missing} missing; this layer needs {sorted(want)}")
        extra = sorted(set(arrays) - set(want))
        if extra:
            raise KeyError(f"unexpected adapter arrays {extra}; this layer holds {sorted(want)}")
        for k, shape in want.items():
            if tuple(arrays[k].shape) != shape:
                raise ValueError(f"{k} has shape {tuple(arrays[k].shape)}, this layer needs {shape}")
        if self.merged:
            raise RuntimeError("cannot load adapter arrays into a merged layer; unmerge() first")
        xp = self.xp
        for k in want:
            self.params[k] = xp.asarray(to_host(arrays[k]).astype(self.dtype))
        self.grads = {}


# ------------------------------------------------------------------------------------------------
# Model-level helpers
# ------------------------------------------------------------------------------------------------
def modules_to_save_paths(model: Module, names, target_paths=()) -> list[str]:
    """The paths of the modules ``modules_to_save`` trains in full, by PEFT's rule (peft
    ``utils/other.py _set_trainable``): every module whose dotted path ENDS WITH one of ``names``,
    as a plain string suffix (so "norm" also picks Llama's input_layernorm). Only the outermost of
    nested matches is listed. Every parameter below a listed module becomes trainable; PEFT saves
    it under ``base_model.model.<path>.<param>`` (the ``modules_to_save.default`` infix dropped).

    Refused, before any work, with a ValueError naming what is wrong: a list that names no module
    holding parameters (PEFT's strict check; an entry matching nothing is allowed when another
    matches, as in PEFT, so one list can serve several architectures); a match that is, holds or lies inside a LoRA target (``target_paths``);
    a match holding the tied embedding (the engine's head shares it; PEFT would train an untied copy).
    """
    if not names:
        return []
    paths = [p for p, m in model.named_modules() if p and any(True for _ in m.named_parameters())]
    found = [p for p in paths if any(p.endswith(name) for name in names)]
    if not found:  # PEFT's strict check: an error when the list names no module at all
        leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
        raise ValueError(f"modules_to_save {list(names)!r} names no module of the model; modules holding "
                         f"parameters are named {leaves}")
    outer = [p for p in found if not any(p.startswith(q + ".") for q in found)]
    for p in outer:
        for t in target_paths:
            if p == t or p.startswith(t + ".") or t.startswith(p + "."):
                raise ValueError(f"modules_to_save picks {p!r}, which overlaps the LoRA target {t!r}; "
                                 "a module is either adapted or saved, not both")
    tied = getattr(model, "TIED_EMBEDDING", None)
    if tied is not None and getattr(model.config, "tie_word_embeddings", True):
        for p in outer:
            if tied.startswith(p + "."):
                raise ValueError(f"modules_to_save picks {p!r}, which holds the tied embedding {tied!r} "
                                 "(shared with the language-model head): leave it out")
    return outer


def modules_to_save_parameter_count(model: Module, names, target_paths=()) -> int:
    """Entries the modules_to_save train: the sizes of every parameter below the chosen modules."""
    return int(sum(model.get_submodule(p).num_parameters() for p in modules_to_save_paths(model, names, target_paths)))


def lora_layers(model: Module) -> list[tuple[str, LoraLinear]]:
    """(path, layer) of every LoRA-family layer in ``model``, in model order."""
    return adapter_layers(model, LoraLinear)


RECIPES = (
    Recipe("lora", "LoRA", lambda options, size: LoraConfig.for_run(options, size), mixed_ranks=True),
    Recipe("rslora", "rsLoRA", lambda options, size: LoraConfig.for_run(options, size, use_rslora=True),
           mixed_ranks=True),
    Recipe("qlora", "QLoRA", lambda options, size: LoraConfig.for_run(options, size), quantized=True,
           mixed_ranks=True),
)
