"""RoSA: robust adaptation with a sparse-plus-low-rank delta, ΔW = s·B A + S.

Sources: Nikdan et al., "RoSA: Accurate Parameter-Efficient Fine-Tuning via Robust Adaptation"
(ICML 2024); IST-DASLab/peft-rosa ``src/peft/tuners/rosa/{config,layer,scheduler,hooks,
rosa_functions,splinear}.py`` (field names, schedules, key names and the accumulation rule are
taken from there as facts; the code here is written from the equations).

Shape legend: N tokens (B·T, or any leading dims), d_in, d_out; r rank; nnz = int(d · (d_out · d_in))
entries of the sparse adapter S (d_out, d_in), stored in CSR (spectral_peft.sparse.CSR).

    y = x (W + S)ᵀ + b + s · dropout(x) Aᵀ Bᵀ               impl 'sp_add' (the default)
    y = x Wᵀ + b + x Sᵀ + s · dropout(x) Aᵀ Bᵀ              impl 'spmm'

    A (r, d_in), B (d_out, r), s = lora_alpha / r (lora_alpha / √r with use_rslora; 1 when r = 0).

Backward (dY (N, d_out)):
    dS_values = SDDMM(support, dYᵀ, X)      dYᵀX read on the support only, never formed densely
    dX        = dY (W + S) + s·(dY B) A      (through dropout's mask on the low-rank branch)
    dA, dB    as LoRA (spectral_peft.ops.lowrank)

The support of S is chosen once from the dense weight gradients G = dYᵀX of the frozen W, collected
over ``spa_num_grads`` steps: mode 'mean_squared' (default, a diagonal Fisher) keeps mean(G²),
mode 'mean' keeps mean(G); per layer the k = int(d · numel) entries largest in |collected| are kept,
ties broken as every budget in the engine (spectral_peft.budget.topk_mask). The layer forms G
on demand in its backward while collecting and keeps only the running sum.

Parameters are stored under peft-rosa's key suffixes, so PeftModel names are adapter-file keys:
``rosa_A.weight`` (r, d_in), ``rosa_B.weight`` (d_out, r), ``rosa_spa.values`` (nnz,); the CSR
index arrays ``rosa_spa.row_offs`` (d_out+1,), ``rosa_spa.col_idx`` (nnz,), ``rosa_spa.row_idx``
(d_out,) are buffers written to and read from the adapter file (peft_state_dict).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import ClassVar

import numpy as np

from .. import validation as V
from ..backend import to_host
from ..io.safe import parse_safetensors, save_safetensors
from ..module import Linear
from ..sparse import CSR, SDDMM_IMPLS
from .base import AdapterConfig, Controller, Recipe, model_relative, pattern_value
from .rosa_layer import (A_KEY, B_KEY, COL_IDX_KEY, GRAD_ACC_MODES, IMPLS, ROW_IDX_KEY,  # noqa: F401
                         ROW_OFFS_KEY, VALUES_KEY, RosaLinear, check_density, nnz_for)

MASKS_FILE = "rosa_masks.safetensors"  # the two-pass recipe's supports, beside the adapter
SCHEDULE_HELP = "'wl<N>' (e.g. 'wl64'), 'wl0', 'default' (= 'wl0'), 'spa_only' or 'lora_only'"

# --- configuration ---------------------------------------------------------------------------------
@dataclass
class RosaConfig(AdapterConfig):
    """RoSA's config, with peft-rosa's field names (``RosaConfig`` in IST-DASLab/peft-rosa).

    Engine notes: weights are always (d_out, d_in) here (GPT-2's Conv1D is transposed by the
    loader), so ``fan_in_fan_out`` is recorded for the file only; parameters use the model's
    dtype, so ``rosa_dtype`` is recorded for the file only; ``spa_store_transpose`` (a GPU-kernel
    cache in peft-rosa) is likewise kept for the file. ``sddmm_impl`` is the engine's choice of
    SDDMM ('planned', the default: dense, blocked or gathered per support by a measured cost model,
    so never slower than the dense product; 'auto', the same; 'gather'; 'dense'; all give the same
    values).
    """

    peft_type: ClassVar[str] = "ROSA"

    r: int = 8  # LoRA rank (peft-rosa default 8; 0 = sparse only)
    d: float = 0.003  # density of the sparse adapter (peft-rosa default 0.3%)
    target_modules: list[str] | str | None = None
    lora_alpha: float = 8  # scaling s = lora_alpha / r
    lora_dropout: float = 0.0  # dropout on the low-rank branch's input only
    impl: str = "auto"  # 'sp_add' (x (W+S)ᵀ), 'spmm' (x Wᵀ + x Sᵀ); 'auto' = 'sp_add' as in peft-rosa
    spa_store_transpose: bool = True
    spa_num_grads: int = 1  # steps whose weight gradients choose the support
    grad_acc_mode: str = "mean_squared"  # 'mean_squared' (diagonal Fisher) or 'mean'
    mask_load_path: str | None = None  # a directory (or file) of saved supports: skip collection
    mask_save_path: str | None = None  # a directory to write the supports to once chosen
    rosa_dtype: str | None = None
    terminate_after_mask_generation: bool = False  # pass 1 of the two-pass recipe stops there
    schedule: str | None = None  # required: see SCHEDULE_HELP
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True  # True: A ~ kaiming-uniform, B = 0; 'gaussian': A ~ N(0, 1/r²)
    rank_pattern: dict = field(default_factory=dict)
    density_pattern: dict = field(default_factory=dict)  # per-layer density overrides
    alpha_pattern: dict = field(default_factory=dict)
    task_type: str | None = None
    sddmm_impl: str = "planned"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        n = "RosaConfig"
        if self.target_modules is None or (not isinstance(self.target_modules, str) and not self.target_modules):
            raise ValueError("RosaConfig.target_modules must name the linear layers to adapt, e.g. ['c_attn', "
                             f"'c_proj', 'c_fc'], got {self.target_modules!r}")
        V.check_str_list(n, "target_modules", self.target_modules, allow_str=True)
        V.check_int(n, "r", self.r, min=0)
        check_density(self.d, "d")
        V.check_mapping(n, "density_pattern", self.density_pattern, str, lambda o, k, v: check_density(v, k))
        V.check_mapping(n, "rank_pattern", self.rank_pattern, str, lambda o, k, v: V.check_int(o, k, v, min=0))
        V.check_mapping(n, "alpha_pattern", self.alpha_pattern, str, V.check_float)
        V.check_float(n, "lora_alpha", self.lora_alpha)
        V.check_float(n, "lora_dropout", self.lora_dropout, min=0, max=1, max_inclusive=False)
        V.check_choice(n, "impl", self.impl, IMPLS)
        V.check_choice(n, "grad_acc_mode", self.grad_acc_mode, GRAD_ACC_MODES)
        V.check_bool(n, "spa_store_transpose", self.spa_store_transpose)
        V.check_int(n, "spa_num_grads", self.spa_num_grads, min=1,
                    hint="a support cannot be collected over zero batches")
        V.check_optional_path(n, "mask_load_path", self.mask_load_path)
        V.check_optional_path(n, "mask_save_path", self.mask_save_path)
        V.check_optional_str(n, "rosa_dtype", self.rosa_dtype)
        V.check_bool(n, "terminate_after_mask_generation", self.terminate_after_mask_generation)
        V.check_bool(n, "fan_in_fan_out", self.fan_in_fan_out)
        V.check_bool(n, "use_rslora", self.use_rslora)
        V.check_str_list(n, "modules_to_save", self.modules_to_save, allow_none=True)
        V.check_optional_str(n, "task_type", self.task_type)
        if self.mask_load_path is not None and self.mask_save_path is not None:
            raise ValueError("mask_load_path and mask_save_path cannot both be set (peft-rosa's rule): "
                             f"got {self.mask_load_path!r} and {self.mask_save_path!r}")
        if self.terminate_after_mask_generation and self.mask_save_path is None:
            raise ValueError("terminate_after_mask_generation=True needs mask_save_path, got None")
        if self.bias != "none":
            raise ValueError(f"bias must be 'none' (trainable base biases are not supported for RoSA), got {self.bias!r}")
        V.check_choice(n, "init_lora_weights", self.init_lora_weights, (True, False, "gaussian"))
        V.check_choice(n, "sddmm_impl", self.sddmm_impl, tuple(sorted(SDDMM_IMPLS)))
        # a density_pattern can give layers a sparse adapter even with d = 0
        build_schedule(self.schedule, self.spa_num_grads, max([self.d, *self.density_pattern.values()]),
                       collect=self.mask_load_path is None)

    # --- the AdapterConfig protocol ---
    def layer_settings(self, path: str) -> tuple[int, float, float]:
        """(r, d, lora_alpha) for the layer at ``path``, after rank/density/alpha patterns."""
        r = pattern_value(self.rank_pattern, path, self.r)
        d = pattern_value(self.density_pattern, path, self.d)
        alpha = pattern_value(self.alpha_pattern, path, self.lora_alpha)
        return int(r), float(d), float(alpha)

    def make_layer(self, path: str, base: Linear, rng) -> RosaLinear:
        r, d, alpha = self.layer_settings(path)
        return RosaLinear(base, r=r, d=d, lora_alpha=alpha, lora_dropout=self.lora_dropout,
                          impl=self.impl, use_rslora=self.use_rslora, init_lora_weights=self.init_lora_weights,
                          grad_acc_mode=self.grad_acc_mode, sddmm_impl=self.sddmm_impl, rng=rng)

    def make_controller(self, peft_model) -> RosaController:
        return RosaController(peft_model, self)

    def parameter_count(self, shapes: dict[str, tuple[int, int]]) -> int:
        """Σ r_path · (d_in + d_out) + nnz_path, nnz = int(d_path · d_out · d_in) (peft-rosa's rule),
        the sparse values counted at their final size even before the support is chosen."""
        total = 0
        for path, shape in shapes.items():
            r, d, _ = self.layer_settings(path)
            total += r * (shape[0] + shape[1]) + nnz_for(d, shape)
        return int(total)

    @classmethod
    def for_run(cls, options, d: float) -> RosaConfig:
        """The main job's RoSA at density ``d``: LoRA rank rosa_r (default r // 2), the warm-up
        schedule 'wl<10% of the steps>' unless one is given."""
        r = options.rosa_r if options.rosa_r is not None else max(1, options.r // 2)
        schedule = options.schedule or f"wl{max(1, options.steps // 10)}"
        return cls(r=r, d=d, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                   target_modules=options.target_list(), spa_num_grads=options.spa_num_grads, schedule=schedule)

    def to_json_dict(self, peft_model=None) -> dict:
        d = asdict(self)
        d["peft_type"] = self.peft_type
        if isinstance(d["target_modules"], (list, tuple, set)):
            d["target_modules"] = sorted(d["target_modules"])
        return d

    @classmethod
    def from_json_dict(cls, d: dict) -> RosaConfig:
        """Build from adapter_config.json content; keys PEFT writes for every method (peft_type,
        base_model_name_or_path, revision, inference_mode, ...) and unknown keys are ignored."""
        if str(d.get("peft_type", "ROSA")).upper() != "ROSA":
            raise ValueError(f"peft_type must be 'ROSA' for a RosaConfig, got {d.get('peft_type')!r}")
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if isinstance(kwargs.get("target_modules"), (set, tuple)):
            kwargs["target_modules"] = sorted(kwargs["target_modules"])
        return cls(**kwargs)


def two_pass_configs(config: RosaConfig, mask_dir: str, warmup: int = 64) -> tuple[RosaConfig, RosaConfig]:
    """The published recipe (peft-rosa README, paper §4): pass 1 runs 'wl<warmup>', collects,
    saves the supports to ``mask_dir`` and stops; pass 2 restarts from scratch with the supports
    loaded and both adapters trained from step 0 ('wl0')."""
    first = replace(config, schedule=f"wl{int(warmup)}", mask_save_path=mask_dir, mask_load_path=None,
                    terminate_after_mask_generation=True)
    second = replace(config, schedule="wl0", mask_load_path=mask_dir, mask_save_path=None,
                     terminate_after_mask_generation=False)
    return first, second


# --- schedules -------------------------------------------------------------------------------------
def build_schedule(name: str | None, spa_num_grads: int, d: float, collect: bool = True) -> list[tuple[frozenset, int | None]]:
    """The agenda list of a schedule: [(agenda, end step exclusive or None), ...].

    Facts from peft-rosa ``scheduler.py``: 'wl<N>' = {lora} for N steps, then {lora, grad_collection}
    for spa_num_grads steps (only when no supports were loaded), then {lora, spa}; 'default'/'df' =
    'wl0'; 'spa_only' = {grad_collection} then {spa}; 'lora_only' = {lora} (needs d = 0).
    """
    if name is None:
        raise ValueError(f"schedule must be set: {SCHEDULE_HELP}; got None")
    if not isinstance(name, str):
        raise ValueError(f"schedule must be a string ({SCHEDULE_HELP}), got {name!r}")
    if name in ("default", "df"):
        name = "wl0"
    out: list[tuple[frozenset, int | None]] = []
    if name == "lora_only":
        if d != 0:
            raise ValueError(f"schedule 'lora_only' needs d = 0, got d={d}")
        return [(frozenset({"lora"}), None)]
    if name == "spa_only":
        if d <= 0:
            raise ValueError(f"schedule 'spa_only' needs d > 0, got d={d}")
        if collect:
            out.append((frozenset({"grad_collection"}), spa_num_grads))
        out.append((frozenset({"spa"}), None))
        return out
    m = re.fullmatch(r"wl(\d+)", name)
    if m is None:
        raise ValueError(f"unknown schedule {name!r}; use {SCHEDULE_HELP}")
    warmup = int(m.group(1))
    if warmup > 0 and d <= 0:
        raise ValueError(f"schedule {name!r} needs d > 0 (use 'lora_only' for d = 0), got d={d}")
    if warmup > 0:
        out.append((frozenset({"lora"}), warmup))
    if collect and d > 0:
        out.append((frozenset({"lora", "grad_collection"}), warmup + spa_num_grads))
    out.append((frozenset({"lora", "spa"}), None))
    return out


def agenda_at(schedule: list[tuple[frozenset, int | None]], step: int) -> frozenset:
    """The agenda of optimizer step ``step`` (0-based)."""
    for agenda, end in schedule:
        if end is None or step < end:
            return agenda
    raise AssertionError("a schedule always ends with an open-ended agenda")


# --- mask files (the two-pass recipe) ---------------------------------------------------------------
def _mask_file(path: str) -> str:
    return path if path.endswith(".safetensors") else os.path.join(path, MASKS_FILE)


def save_masks(supports: dict, path: str) -> str:
    """Write supports {layer path: CSR} to ``path`` (a directory; the file is rosa_masks.safetensors)
    as CSR arrays "<layer>.row_offs" (d_out+1,), "<layer>.col_idx" (nnz,), shapes in the metadata.
    Returns the file written (atomically, through spectral_peft.io.safe)."""
    tensors, shapes = {}, {}
    for name, csr in supports.items():
        tensors[f"{name}.row_offs"] = to_host(csr.indptr).astype(np.int32)
        tensors[f"{name}.col_idx"] = to_host(csr.indices).astype(np.int32)
        shapes[name] = list(csr.shape)
    file = _mask_file(path)
    os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
    save_safetensors(tensors, file, metadata={"format": "rosa_masks", "shapes": json.dumps(shapes)})
    return file


def load_masks(path: str) -> dict:
    """Read supports written by :func:`save_masks`: {layer path: CSR with zero float64 values}.
    Every array is checked (file format, keys, CSR structure) before anything is returned."""
    file = _mask_file(path)
    if not os.path.exists(file):
        raise FileNotFoundError(f"mask_load_path: no RoSA masks at {file!r}")
    with open(file, "rb") as f:
        arrays, meta = parse_safetensors(f.read(), file)
    if "shapes" not in (meta or {}):
        raise ValueError(f"{file!r} is not a RoSA masks file (no 'shapes' metadata)")
    out = {}
    for name, shape in json.loads(meta["shapes"]).items():
        for suffix in ("row_offs", "col_idx"):
            if f"{name}.{suffix}" not in arrays:
                raise ValueError(f"{file!r}: missing {name}.{suffix}")
        col_idx = arrays[f"{name}.col_idx"].astype(np.int64)
        out[name] = CSR(np.zeros(col_idx.size), arrays[f"{name}.row_offs"].astype(np.int64), col_idx, tuple(shape))
    return out


# --- the controller (schedules and the support collection) ------------------------------------------
class RosaController(Controller):
    """Runs a RoSA schedule: which adapters train at each step, when gradients are collected, when
    the supports are chosen (and saved), for every RosaLinear of a PeftModel.

    It counts optimizer steps itself (``self.step``, incremented by after_optimizer_step), as
    peft-rosa's scheduler does, so it works whatever step numbers the loop passes. The gradients a
    layer collects in its backward are committed here, once the step is taken: a step the NaN
    guard skips (no after_optimizer_step) changes nothing, and before_forward drops its leftovers. Supports are
    chosen in after_optimizer_step of the last collection step, so the next step trains them.
    ``should_stop`` turns True when terminate_after_mask_generation asks the loop to stop.
    """

    def __init__(self, peft_model, config: RosaConfig):
        self.config = config
        self.layers: list[tuple[str, RosaLinear]] = [(p, m) for p, m in peft_model.adapter_layers()
                                                      if isinstance(m, RosaLinear)]
        max_d = max([m.d for _, m in self.layers], default=config.d)
        self.schedule = build_schedule(config.schedule, config.spa_num_grads, max_d,
                                       collect=config.mask_load_path is None)
        self.step = 0
        self.activated = False
        self.should_stop = False
        if not any("lora" in agenda for agenda, _ in self.schedule):
            for _, layer in self.layers:
                if layer.r > 0:
                    layer.freeze(A_KEY, B_KEY)
        if config.mask_load_path is not None:
            self.install_supports(load_masks(config.mask_load_path))

    # --- supports ---
    def sparse_layers(self):
        return [(p, m) for p, m in self.layers if m.d > 0]

    def install_supports(self, supports: dict, reset_values: bool = True) -> None:
        """Install {layer path: CSR or mask} on every sparse layer, all checked first."""
        layers = self.sparse_layers()
        missing = [p for p, _ in layers if p not in supports]
        if missing:
            raise ValueError(f"supports missing for RoSA layers {missing[:3]}{'...' if len(missing) > 3 else ''}; "
                             f"the masks name {sorted(supports)[:3]}")
        for p, layer in layers:
            s = supports[p]
            shape = s.shape if isinstance(s, CSR) else tuple(s.shape)
            count = s.nnz if isinstance(s, CSR) else int(s.sum())
            if tuple(shape) != layer.shape or count != layer.nnz:
                raise ValueError(f"support for {p!r} is {tuple(shape)} with {count} entries; the layer needs "
                                 f"{layer.shape} with nnz = {layer.nnz}")
        for p, layer in layers:
            layer.set_support(supports[p], reset_values=reset_values)
            layer.clear_collection()
            layer.collecting = False
        self.activated = True

    def generate_supports(self) -> dict:
        """{layer path: CSR} from the collected gradients (every layer checked before any is set)."""
        out = {}
        for p, layer in self.sparse_layers():
            out[p] = CSR.from_mask(layer.select_support(), dtype=layer.dtype)
        return out

    # --- hooks ---
    def before_forward(self, step: int) -> None:
        agenda = agenda_at(self.schedule, self.step)
        sparse = self.sparse_layers()
        if not self.activated and sparse and all(m.spa is not None for _, m in sparse):
            self.activated = True  # supports came with a loaded adapter: never collect over them
        for _, layer in self.sparse_layers():
            layer.discard_pending()  # left by a step that was not taken
            layer.collecting = "grad_collection" in agenda and not self.activated
            if layer.spa is not None:
                if "spa" in agenda:
                    layer.unfreeze(VALUES_KEY)
                else:
                    layer.freeze(VALUES_KEY)

    def after_optimizer_step(self, step: int) -> None:
        for _, layer in self.sparse_layers():
            layer.commit_collection()
        agenda = agenda_at(self.schedule, self.step)
        following = agenda_at(self.schedule, self.step + 1)
        if not self.activated and "grad_collection" in agenda and "grad_collection" not in following:
            supports = self.generate_supports()
            if self.config.mask_save_path is not None:
                save_masks(supports, self.config.mask_save_path)
            if self.config.terminate_after_mask_generation:
                self.should_stop = True
                for _, layer in self.sparse_layers():
                    layer.clear_collection()
                    layer.collecting = False
            else:
                self.install_supports(supports)
        self.step += 1

    def gradient_statistics(self) -> list:
        """The gradients this step collected (one (d_out, d_in) array per collecting layer): the
        trainer all-reduces them with the parameters' gradients, so every rank chooses the support
        of the global gradient."""
        return [layer.pending_sum for _, layer in self.sparse_layers() if layer.pending_sum is not None]

    # --- exact resume ---
    def state_dict(self) -> dict:
        state = {"step": self.step, "activated": self.activated, "should_stop": self.should_stop}
        for p, layer in self.sparse_layers():
            state[f"{p}.grad_count"] = int(layer.grad_count)
            if layer.grad_sum is not None:
                state[f"{p}.grad_sum"] = to_host(layer.grad_sum).copy()
            if layer.spa is not None:
                state[f"{p}.row_offs"] = to_host(layer.spa.indptr).copy()
                state[f"{p}.col_idx"] = to_host(layer.spa.indices).copy()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore collection progress and supports (values are parameters: the checkpoint of the
        parameters restores them; they are not reset here). Checked fully before installing."""
        for key in ("step", "activated"):
            if key not in state:
                raise ValueError(f"RoSA controller state lacks {key!r}")
        supports = {}
        for p, layer in self.sparse_layers():
            if f"{p}.grad_sum" in state and tuple(np.shape(state[f"{p}.grad_sum"])) != layer.shape:
                raise ValueError(f"{p}.grad_sum has shape {np.shape(state[f'{p}.grad_sum'])}, expected {layer.shape}")
            if f"{p}.row_offs" in state:
                supports[p] = CSR(np.zeros(np.shape(state[f"{p}.col_idx"])[0]), np.asarray(state[f"{p}.row_offs"]),
                                  np.asarray(state[f"{p}.col_idx"]), layer.shape)
        if state["activated"] and supports:
            self.install_supports(supports, reset_values=False)
        else:
            self.activated = bool(state["activated"])
        for p, layer in self.sparse_layers():
            layer.grad_count = int(state.get(f"{p}.grad_count", 0))
            gs = state.get(f"{p}.grad_sum")
            layer.grad_sum = None if gs is None else layer.xp.asarray(np.array(gs, dtype=layer.dtype))
        self.step = int(state["step"])
        self.should_stop = bool(state.get("should_stop", False))

    def report(self, evaluate) -> dict:
        """The figures' data: every layer's density and the support of the layer keeping most."""
        out = {"density": density_summary(self.layers)}
        sparse = [(p, m) for p, m in self.layers if m.spa is not None]
        if sparse:
            path, layer = max(sparse, key=lambda pm: pm[1].spa.nnz)
            flat = np.flatnonzero(to_host(layer.support_mask()).reshape(-1))
            out["support"] = {"layer": _short_path(path), "shape": list(layer.shape), "nnz": int(layer.spa.nnz),
                              "indices": [int(v) for v in flat]}
        return out


def _short_path(path: str) -> str:
    """A layer's path as the figures label it: relative to the wrapped model, "transformer." dropped."""
    return model_relative(path).replace("transformer.", "")


def density_summary(layers) -> dict:
    """{short layer path: {"nnz", "shape": [d_out, d_in], "density": nnz / numel}} of the given
    (path, RosaLinear) pairs, in model order: the installed support's nnz, else the layer's target."""
    out = {}
    for path, layer in layers:
        nnz = int(layer.spa.nnz) if layer.spa is not None else int(layer.nnz)
        out[_short_path(path)] = {"nnz": nnz, "shape": list(layer.shape), "density": nnz / float(layer.d_out * layer.d_in)}
    return out


# --- the budget helper ------------------------------------------------------------------------------
# LLaMA-2-7B's adapted linears (all seven projections of each of the 32 blocks), (d_out, d_in):
# q, k, v, o 4096×4096; gate, up 11008×4096; down 4096×11008 (Touvron et al. 2023, the HF config).
LLAMA2_7B_SHAPES: list[tuple[int, int]] = 32 * ([(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)])


def rosa_parameter_count(shapes, r: int, d: float) -> int:
    """Σ over matrices of r·(d_in + d_out) + int(d · (d_out · d_in)): the trainable size of RoSA
    (r = 0: sparse only; d = 0: LoRA)."""
    return int(sum(r * (do + di) + (nnz_for(d, (do, di)) if d > 0 else 0) for do, di in shapes))


@dataclass(frozen=True)
class BudgetPair:
    r: int
    d: float
    params: int  # trainable parameters of RoSA(r, d) on the shapes
    budget: int

    @property
    def fraction(self) -> float:
        return self.params / self.budget


def equal_budget_pairs(budget: int, shapes, ranks=(0, 1, 2, 4, 8, 12, 16, 32, 64), resolution: float = 1e-4
                       ) -> list[BudgetPair]:
    """For each rank r, the largest density on a grid of ``resolution`` whose RoSA(r, d) fits in
    ``budget`` trainable parameters (so comparisons run at equal budget). Ranks whose LoRA part
    alone exceeds the budget are left out. ``shapes``: [(d_out, d_in), ...] of the adapted matrices.

    The RoSA paper's rows (LLaMA-2-7B, budget of LoRA r = 16 ≈ 40M): r = 12 → d = 0.15%,
    r = 4 → d = 0.45% at resolution 5e-4.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0 trainable parameters, got {budget}")
    if resolution <= 0:
        raise ValueError(f"resolution must be > 0, got {resolution}")
    numel = sum(do * di for do, di in shapes)
    out = []
    for r in ranks:
        lora = rosa_parameter_count(shapes, r, 0.0)
        if lora > budget:
            continue
        steps = int((budget - lora) / numel / resolution) if numel else 0
        d = min(1.0, round(steps * resolution, 12))
        while d > 0 and rosa_parameter_count(shapes, r, d) > budget:
            steps -= 1
            d = round(steps * resolution, 12)
        # int(d·numel) floors each layer's count, so a slightly larger density may still fit
        while round((steps + 1) * resolution, 12) <= 1.0 and \
                rosa_parameter_count(shapes, r, round((steps + 1) * resolution, 12)) <= budget:
            steps += 1
            d = round(steps * resolution, 12)
        out.append(BudgetPair(r=int(r), d=d, params=rosa_parameter_count(shapes, r, d), budget=int(budget)))
    return out


RECIPES = (
    Recipe("rosa", "RoSA", lambda options, d: RosaConfig.for_run(options, d), knob="d", preset="d"),
    Recipe("qrosa", "QRoSA", lambda options, d: RosaConfig.for_run(options, d), knob="d", preset="d", quantized=True),
)
