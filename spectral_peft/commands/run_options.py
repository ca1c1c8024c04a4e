"""The options of `spectral-peft run`: one dataclass, its command-line flags and its JSON file.

Options use PEFT's field names where PEFT has one (r, lora_alpha, lora_dropout, target_modules,
init_r, target_r, tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight; RoSA's d, spa_num_grads,
schedule; bitsandbytes' quant_type, blocksize, compress_statistics). ``--config FILE`` reads a JSON
object of the same names; flags given on the command line override the file, which overrides
``--quick``, which overrides the defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
from dataclasses import dataclass

from ..adapters.registry import METHODS
from ..backend import DEVICES, emulation_unavailable_reason, gpu_unavailable_reason
from ..prune.masks import check_options as check_prune_options
from ..quant import BLOCKSIZES_4BIT
from .contract import help_text

# The default run. Each method costs about 20 s of the default run's 5-minute budget on 2 cores; a
# method joins here only while that budget holds. `--methods all` runs every method of the registry.
DEFAULT_METHODS = ("full", "lora", "rslora", "dora", "dylora", "lorafa", "deltalora", "adalora", "rosa", "qlora",
                   "qrosa")

# The base architectures --arch chooses (commands/pretrain.py builds each), and the linears each one's
# default run adapts: every attention and MLP projection (GPT-2's c_proj is both the attention's
# output and the MLP's down projection; Llama's SwiGLU MLP has gate, up and down).
ARCHS = ("gpt2", "llama")
ARCH_TARGETS = {"gpt2": "c_attn,c_proj,c_fc", "llama": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"}


@dataclass
class RunConfig:
    """Every option of `spectral-peft run`; each default carries its reason."""

    arch: str = "gpt2"  # the base model: GPT-2, or Llama (RMSNorm, RoPE, SwiGLU, grouped-query attention)
    methods: str = "default"  # comma-separated subset of METHODS, "default" (DEFAULT_METHODS) or "all"
    steps: int = 200  # fine-tuning optimizer steps per method (11 methods in ~5 minutes on 2 cores)
    pretrain_steps: int = 1000  # base-model steps (~1.5 min, cached): Python's byte statistics
    batch_size: int = 16  # sequences per step
    n_positions: int = 64  # T: sequence length (bytes) and the base's context size
    n_layer: int = 4  # a base shape small enough for 2 CPU cores
    n_embd: int = 128
    n_head: int = 4  # query heads; a Llama base shares n_head/2 key/value heads (grouped-query attention)
    pretrain_lr: float = 2e-3  # AdamW, warm-up then cosine decay
    lr: float = 2e-3  # the PEFT methods' AdamW learning rate (adapters start at zero)
    full_lr: float = 3e-4  # full fine-tuning moves every weight: a smaller step
    prompt_lr: float = 3e-2  # prefix / prompt tuning (virtual tokens start at N(0, 1)): PEFT's examples' step
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    budget: int | None = None  # trainable parameters to match; None: LoRA's count at r
    tolerance: float = 0.05  # allowed relative distance of a method's count from the budget
    # LoRA family (PEFT LoraConfig fields)
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: str | None = None  # comma list (PEFT's list form) matched by suffix; None: ARCH_TARGETS[arch]
    # AdaLoRA (PEFT AdaLoraConfig fields); None: chosen from the budget
    init_r: int | None = None
    target_r: int | None = None
    tinit: int | None = None  # None: 10% of steps
    tfinal: int | None = None  # None: 20% of steps
    deltaT: int = 5
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    # RoSA (peft-rosa RosaConfig fields); None: chosen from the budget
    rosa_r: int | None = None  # RoSA's LoRA rank (peft-rosa's field r); None: r // 2
    d: float | None = None  # sparse density; None: whatever fills the budget left by rosa_r
    spa_num_grads: int = 4
    schedule: str | None = None  # None: 'wl<10% of steps>'
    # QLoRA / QRoSA (bitsandbytes fields)
    quant_type: str = "nf4"
    blocksize: int = 64
    compress_statistics: bool = True
    # Delta-LoRA (DeltaLoraConfig fields: the paper's λ and K; K = 0 as the runs are short)
    delta_lambda: float = 2.0
    delta_start_step: int = 0
    # DyLoRA (DyLoraConfig field)
    dylora_mode: str = "frozen"
    # LongLoRA's context extension (commands/long_context.py): 0 off; F >= 2 extends the base F times
    longlora_context: int = 0
    # pruning of the frozen base (spectral_peft.prune): extra rows, LoRA/QLoRA on the pruned base
    prune: str | None = None  # comma list of sparsities, e.g. "0.5"; None: no pruned rows
    prune_method: str = "wanda"  # magnitude, wanda, or N:M such as 2:4 (Wanda-scored)
    # evaluation, placement, output
    eval_every: int = 25
    eval_batches: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    threads: int = 1  # BLAS threads (0: as configured). 1: small GEMMs gain little from 2, and a busy machine makes 2 threads ~10x slower
    out: str = "runs"
    cache_dir: str | None = None  # None: $SPECTRAL_PEFT_CACHE or ~/.cache/spectral_peft
    figures: bool = True
    progress: bool = True
    tensorboard: str | None = None  # a folder for TensorBoard event files of the per-step metrics; None: none

    def __post_init__(self):
        if self.target_modules is None and isinstance(self.arch, str) and self.arch in ARCH_TARGETS:  # an unknown arch: validate() says so
            self.target_modules = ARCH_TARGETS[self.arch]

    def method_list(self) -> list[str]:
        if self.methods.strip() == "all":
            return list(METHODS)
        if self.methods.strip() == "default":
            return list(DEFAULT_METHODS)
        return [m.strip().lower() for m in self.methods.split(",") if m.strip()]

    def target_list(self) -> list[str]:
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]

    def validate(self) -> None:
        """Raise ValueError naming the option, its value and what would be right. Checks only the
        options themselves (no data, no model, no file system); `spectral-peft run` checks the
        rest (commands/run.py, the prechecks) before it creates the run folder."""
        self._check_types()
        if self.arch not in ARCHS:
            raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        bad = [m for m in self.method_list() if m not in METHODS]
        if bad or not self.method_list():
            raise ValueError(f"--methods {self.methods!r}: unknown {bad or 'empty list'}; choose from "
                             f"{', '.join(METHODS)}, 'default' or 'all'")
        names = self.method_list()
        twice = sorted({m for m in names if names.count(m) > 1})
        if twice:
            raise ValueError(f"--methods {self.methods!r}: {', '.join(map(repr, twice))} named more than once "
                             "(names are case-insensitive); name each method once")
        positive = ("steps", "pretrain_steps", "batch_size", "n_positions", "n_layer", "n_embd", "n_head", "r",
                    "deltaT", "spa_num_grads", "blocksize", "eval_every", "eval_batches")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name} must be an integer >= 1, got {v!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"--threads must be an integer >= 0 (0: leave BLAS as configured), got {self.threads!r}")
        if self.pretrain_steps < 1:
            raise ValueError(f"--pretrain_steps must be >= 1, got {self.pretrain_steps}")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n_embd {self.n_embd} must be divisible by --n_head {self.n_head}")
        if self.arch == "llama" and self.n_head % 2:
            raise ValueError(f"--arch llama needs an even --n_head (grouped-query attention with n_head/2 key/value "
                             f"heads), got {self.n_head}")
        for name in ("lr", "full_lr", "prompt_lr", "pretrain_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"--tolerance must lie in (0, 1), got {self.tolerance}")
        for name in ("init_r", "target_r", "rosa_r"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name} must be an integer >= 1 (or auto), got {v!r}")
        if not 0 <= self.weight_decay < float("inf"):
            raise ValueError(f"--weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not 0 < self.max_grad_norm < float("inf"):
            raise ValueError(f"--max_grad_norm must be a finite number > 0, got {self.max_grad_norm!r}")
        if self.seed < 0:
            raise ValueError(f"--seed must be an integer >= 0, got {self.seed}")
        if self.blocksize not in BLOCKSIZES_4BIT:
            raise ValueError(f"--blocksize must be one of {', '.join(map(str, BLOCKSIZES_4BIT))} (bitsandbytes' "
                             f"4-bit block sizes), got {self.blocksize}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"--budget must be a positive number of parameters, got {self.budget}")
        if self.d is not None and not 0 <= self.d <= 1:
            raise ValueError(f"--d (RoSA density) must lie in [0, 1], got {self.d}")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"--quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        reason = {"gpu": gpu_unavailable_reason, "gpu-emulated": emulation_unavailable_reason,
                  "cpu": lambda: None}[self.device]()
        if reason is not None:
            raise ValueError(f"--device {self.device}: {reason}; use --device cpu, or --device gpu-emulated "
                             "(CuPy's rules on the CPU)")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"--dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if not (self.target_modules and self.target_list()):
            raise ValueError(f"--target_modules is empty; name linears such as {ARCH_TARGETS[self.arch]}")
        F = self.longlora_context
        if F != 0 and (F < 2 or (F * self.n_positions) % 8):
            raise ValueError(f"--longlora_context must be 0 (off) or an integer >= 2 with F·n_positions divisible by 8 "
                             f"(S2-Attn's G = T/4 must be even), got {F} with --n_positions {self.n_positions}")
        check_prune_options(self.prune, self.prune_method)
        if self.tensorboard is not None and importlib.util.find_spec("tensorboard") is None:
            raise ValueError(f"--tensorboard {self.tensorboard}: the tensorboard package is not installed; "
                             "pip install tensorboard, or leave --tensorboard out")
        if self.init_r is not None and self.target_r is not None and self.target_r > self.init_r:
            raise ValueError(f"--target_r {self.target_r} exceeds --init_r {self.init_r}; target_r must be <= init_r")


    def _check_types(self) -> None:
        """Each option's type (a --config file can hold anything): bool options true/false, int
        options integers, float options numbers, str options strings; None where the default is."""
        for f in dataclasses.fields(self):
            v, default = getattr(self, f.name), f.default
            if v is None and (default is None or f.name == "target_modules"):
                continue
            if isinstance(default, bool) or f.type == "bool":
                ok, want = isinstance(v, bool), "true or false"
            elif f.type.startswith("int"):
                ok, want = isinstance(v, int) and not isinstance(v, bool), "an integer"
            elif f.type.startswith("float"):
                ok, want = isinstance(v, (int, float)) and not isinstance(v, bool), "a number"
            else:
                ok, want = isinstance(v, str), "a string"
            if not ok:
                raise ValueError(f"--{f.name} must be {want}, got {v!r}")


def _bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(kind):
    def parse(text):
        if str(text).lower() in ("none", "auto", ""):
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} or 'auto', got {text!r}") from None
    parse.__name__ = kind.__name__
    return parse


_HELP = {
    "arch": f"the base model: {' or '.join(ARCHS)}",
    "methods": f"comma list of {', '.join(METHODS)}, each named once; 'default' ({','.join(DEFAULT_METHODS)}) or 'all'",
    "steps": "fine-tuning optimizer steps per method",
    "pretrain_steps": "base-model pretraining steps (the base is cached)",
    "batch_size": "sequences per step",
    "n_positions": "sequence length T (bytes) and the base's context size",
    "n_layer": "transformer blocks of the base",
    "n_embd": "the base's hidden width (divisible by --n_head)",
    "n_head": "query heads (a Llama base shares n_head/2 key/value heads)",
    "pretrain_lr": "the base's AdamW learning rate (warm-up, then cosine decay)",
    "lr": "the PEFT methods' AdamW learning rate",
    "full_lr": "full fine-tuning's AdamW learning rate",
    "prompt_lr": "prefix and prompt tuning's AdamW learning rate",
    "weight_decay": "AdamW weight decay (>= 0)",
    "max_grad_norm": "clip the global gradient norm to this (> 0)",
    "budget": "trainable parameters every method is matched to",
    "tolerance": "allowed relative distance of a method's count from the budget, in (0, 1)",
    "r": "LoRA rank (PEFT's r)",
    "lora_alpha": "LoRA scale numerator: the update is scaled by lora_alpha / r",
    "lora_dropout": "dropout on the LoRA input, in [0, 1)",
    "target_modules": "comma list of linear names to adapt, matched by suffix",
    "init_r": "AdaLoRA's initial rank",
    "target_r": "AdaLoRA's final average rank (<= --init_r)",
    "tinit": "AdaLoRA: steps before rank pruning starts",
    "tfinal": "AdaLoRA: final steps at the target budget",
    "deltaT": "AdaLoRA: steps between rank allocations",
    "beta1": "AdaLoRA: EMA factor of the sensitivity, in [0, 1)",
    "beta2": "AdaLoRA: EMA factor of the uncertainty, in [0, 1)",
    "orth_reg_weight": "AdaLoRA: weight of the orthogonality regulariser (>= 0)",
    "rosa_r": "RoSA's LoRA rank (peft-rosa's r)",
    "d": "RoSA sparse density, in [0, 1]",
    "spa_num_grads": "RoSA: gradients accumulated to choose the sparse support",
    "schedule": "RoSA's schedule (peft-rosa: 'wl<steps>', 'lora_only', 'spa_only', ...)",
    "quant_type": "QLoRA/QRoSA 4-bit code: nf4 or fp4",
    "blocksize": "QLoRA/QRoSA quantisation block size (bitsandbytes' 32 ... 4096)",
    "compress_statistics": "QLoRA/QRoSA: quantise the block statistics again (double quantisation)",
    "delta_lambda": "Delta-LoRA's lambda: the weight update's multiplier",
    "delta_start_step": "Delta-LoRA: steps before the base weight starts to move (K)",
    "dylora_mode": "DyLoRA's rank sampling mode: frozen or full",
    "longlora_context": "0: off; F >= 2: extend the base's context F times and report eval loss at 1x/2x/4x with and without LongLoRA",
    "prune": "add rows of LoRA/QLoRA on the base pruned to these sparsities (comma list in [0, 1))",
    "prune_method": "how --prune prunes: magnitude, wanda, or N:M such as 2:4 (Wanda-scored; magnitude-2:4)",
    "eval_every": "evaluate every this many steps",
    "eval_batches": "batches of the held-out evaluation set",
    "device": "cpu, gpu (CuPy) or gpu-emulated (CuPy's rules on the CPU)",
    "dtype": "float32 or float64",
    "seed": "seed of the initialisation, the batches and the dropout masks (>= 0)",
    "threads": "BLAS threads; 0: as configured",
    "out": "folder that receives <timestamp>/ and latest",
    "cache_dir": "where pretrained bases are cached",
    "figures": "draw the figures into the run folder",
    "progress": "progress bars on stderr",
    "tensorboard": "also write the per-step metrics (metrics.jsonl) as TensorBoard event files into this folder "
                   "(needs the tensorboard package)",
}
# What a None default (shown as "auto" on the command line) chooses.
_AUTO = {
    "budget": "LoRA's count at --r",
    "target_modules": "every attention and MLP projection of --arch ("
                      + "; ".join(f"{a}: {t}" for a, t in ARCH_TARGETS.items()) + ")",
    "init_r": "from the budget",
    "target_r": "2/3 of init_r",
    "tinit": "10%% of --steps",
    "tfinal": "20%% of --steps",
    "rosa_r": "--r // 2",
    "d": "what fills the budget left by --rosa_r",
    "schedule": "'wl<10%% of --steps>'",
    "cache_dir": "$SPECTRAL_PEFT_CACHE, else ~/.cache/spectral_peft",
    "prune": "no pruned rows",
    "tensorboard": "no event files",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help=help_text("a JSON file of these options (flags given here override it)", "none"))
    for f in dataclasses.fields(RunConfig):
        default = f.default
        flag = "--" + f.name
        alias = ["--" + f.name.replace("_", "-")] if "_" in f.name else []
        metavar = f.name.upper()
        if isinstance(default, bool):
            kind, metavar = _bool, "{true,false}"
        elif f.type in ("int | None",):
            kind = _optional(int)
        elif f.type in ("float | None",):
            kind = _optional(float)
        elif f.type in ("str | None",):
            kind = _optional(str)
        elif isinstance(default, int):
            kind = int
        elif isinstance(default, float):
            kind = float
        else:
            kind = str
        shown = f"auto: {_AUTO[f.name]}" if default is None else default
        parser.add_argument(flag, *alias, dest=f.name, type=kind, default=argparse.SUPPRESS, metavar=metavar,
                            help=help_text(_HELP[f.name], shown, boolean=isinstance(default, bool)))
    parser.add_argument("--quick", action="store_true", default=argparse.SUPPRESS,
                        help=help_text("a smoke test: tiny model, few steps (for CI)", "off", flag=True))


QUICK = dict(steps=6, pretrain_steps=20, batch_size=4, n_positions=32, n_layer=2, n_embd=32, n_head=2,
             eval_every=3, eval_batches=2, r=4, spa_num_grads=2, deltaT=1)


def config_from_args(args) -> RunConfig:
    """RunConfig defaults < --quick < the --config file < flags given on the command line."""
    values: dict = {}
    if getattr(args, "quick", False):
        values.update(QUICK)
    path = getattr(args, "config", None)
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                file_values = json.load(f)
        except OSError as exc:
            raise ValueError(f"--config {path!r}: cannot read it ({exc.strerror})") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config {path!r}: not valid JSON ({exc})") from None
        if not isinstance(file_values, dict):
            raise ValueError(f"--config {path!r}: expected a JSON object of options, got {type(file_values).__name__}")
        names = {f.name for f in dataclasses.fields(RunConfig)}
        unknown = sorted(set(file_values) - names)
        if unknown:
            raise ValueError(f"--config {path!r}: unknown option(s) {unknown}; known: {sorted(names)}")
        if isinstance(file_values.get("target_modules"), list):
            file_values["target_modules"] = ",".join(file_values["target_modules"])
        if isinstance(file_values.get("methods"), list):
            file_values["methods"] = ",".join(file_values["methods"])
        values.update(file_values)
    for f in dataclasses.fields(RunConfig):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    cfg = RunConfig(**values)
    cfg.validate()
    return cfg


