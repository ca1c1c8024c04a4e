"""The `run` command: the main job, on the embedded default, with no download.

1. Data (spectral_peft.data): the standard library's own source (docstrings removed) is the
   pretraining text; the docstrings of a disjoint set of modules are the shifted fine-tuning task
   (train and held-out eval splits). Bytes are tokens (vocabulary 256).
2. Base model: a small GPT-2 (spectral_peft.model) pretrained by the engine on the source code and
   cached in Hugging Face layout (config.json + model.safetensors) under the cache folder, keyed by
   everything that determines it, so later runs skip pretraining.
3. Fine-tuning: every method from that same base, at a matched trainable-parameter budget (within
   ``--tolerance``, 5%; full fine-tuning is the unmatched reference), the same batches, steps and
   evaluation set.
4. Output: a table (method, trainable params, frozen-weight bytes, peak activation bytes, ms/step,
   final eval loss), ``results.json`` (spectral_peft.results) and the figures, in
   ``<out>/<timestamp>/``, with ``<out>/latest`` pointing at it.

Options use PEFT's field names where PEFT has one (r, lora_alpha, lora_dropout, target_modules,
init_r, target_r, tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight; RoSA's d, spa_num_grads,
schedule; bitsandbytes' quant_type, blocksize, compress_statistics). ``--config FILE`` reads a JSON
object of the same names; flags given on the command line override the file.

Shape legend: B batch, T sequence length (= n_positions), V = 256 byte vocabulary.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from . import data as data_mod
from .backend import DEVICES, emulation_unavailable_reason, get_backend, gpu_unavailable_reason, to_host
from .results import RESULTS_FILE, new_results, save_results

METHODS = ("full", "lora", "rslora", "dora", "dylora", "lorafa", "deltalora", "adalora", "rosa", "qlora", "qrosa")
METHOD_TITLES = {
    "full": "full fine-tuning", "lora": "LoRA", "rslora": "rsLoRA", "dora": "DoRA", "dylora": "DyLoRA",
    "lorafa": "LoRA-FA", "deltalora": "Delta-LoRA", "adalora": "AdaLoRA", "rosa": "RoSA", "qlora": "QLoRA",
    "qrosa": "QRoSA",
}


@dataclass
class RunConfig:
    """Every option of `spectral-peft run`; each default carries its reason."""

    methods: str = "all"  # comma-separated subset of METHODS, or "all"
    steps: int = 200  # fine-tuning optimizer steps per method (11 methods in ~5 minutes on 2 cores)
    pretrain_steps: int = 1000  # base-model steps (~1.5 min, cached): Python's byte statistics
    batch_size: int = 16  # sequences per step
    n_positions: int = 64  # T: sequence length (bytes) and GPT-2's context size
    n_layer: int = 4  # a GPT-2 shape small enough for 2 CPU cores
    n_embd: int = 128
    n_head: int = 4
    pretrain_lr: float = 2e-3  # AdamW, warm-up then cosine decay
    lr: float = 2e-3  # the PEFT methods' AdamW learning rate (adapters start at zero)
    full_lr: float = 3e-4  # full fine-tuning moves every weight: a smaller step
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    budget: int | None = None  # trainable parameters to match; None: LoRA's count at r
    tolerance: float = 0.05  # allowed relative distance of a method's count from the budget
    # LoRA family (PEFT LoraConfig fields)
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: str = "c_attn,c_proj,c_fc"  # comma list (PEFT's list form) matched by suffix
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

    def method_list(self) -> list[str]:
        if self.methods.strip() == "all":
            return list(METHODS)
        names = [m.strip().lower() for m in self.methods.split(",") if m.strip()]
        return names

    def target_list(self) -> list[str]:
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]

    def validate(self) -> None:
        """Raise ValueError naming the option, its value and what would be right."""
        bad = [m for m in self.method_list() if m not in METHODS]
        if bad or not self.method_list():
            raise ValueError(f"--methods {self.methods!r}: unknown {bad or 'empty list'}; choose from {', '.join(METHODS)} or 'all'")
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
        for name in ("lr", "full_lr", "pretrain_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"--tolerance must lie in (0, 1), got {self.tolerance}")
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
        if not self.target_list():
            raise ValueError("--target_modules is empty; name linears such as c_attn,c_proj,c_fc")
        if self.init_r is not None and self.target_r is not None and self.target_r > self.init_r:
            raise ValueError(f"--target_r {self.target_r} exceeds --init_r {self.init_r}; target_r must be <= init_r")


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
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
    "methods": f"comma list of {', '.join(METHODS)} (default: all)",
    "steps": "fine-tuning steps per method",
    "pretrain_steps": "base-model pretraining steps (cached)",
    "budget": "trainable parameters every method is matched to (default: LoRA's count at --r)",
    "n_positions": "sequence length T (bytes)",
    "target_modules": "comma list of linear names to adapt",
    "d": "RoSA sparse density (default: filling the budget)",
    "out": "folder that receives <timestamp>/ and latest",
    "config": "a JSON file of these options (flags given here override it)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=_HELP["config"])
    for f in dataclasses.fields(RunConfig):
        default = f.default
        flag = "--" + f.name
        alias = ["--" + f.name.replace("_", "-")] if "_" in f.name else []
        if isinstance(default, bool):
            kind = _bool
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
        parser.add_argument(flag, *alias, dest=f.name, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(),
                            help=f"{_HELP.get(f.name, '')} (default: {default})".strip())
    parser.add_argument("--quick", action="store_true", default=argparse.SUPPRESS,
                        help="a smoke test: tiny model, few steps (for CI)")


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


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------
class Log:
    """Prints to stdout at once (progress bars go to stderr)."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        self.lines.append(text)
        print(text, flush=True)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm import tqdm  # noqa: PLC0415 - a declared dependency, imported where used

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _scalar(x) -> float:
    return float(to_host(x)) if x is not None else float("nan")


def default_cache_dir() -> str:
    return os.environ.get("SPECTRAL_PEFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "spectral_peft")


# ------------------------------------------------------------------------------------------------
# The base model: build, pretrain, cache
# ------------------------------------------------------------------------------------------------
def gpt2_config(cfg: RunConfig):
    from .model import GPT2Config  # noqa: PLC0415

    return GPT2Config(vocab_size=data_mod.ByteTokenizer.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                      n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def base_cache_key(cfg: RunConfig, corpus_sha: str) -> str:
    """Everything that determines the pretrained weights, hashed."""
    key = {"n_positions": cfg.n_positions, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
           "pretrain_steps": cfg.pretrain_steps, "pretrain_lr": cfg.pretrain_lr, "batch_size": cfg.batch_size,
           "seed": cfg.seed, "dtype": cfg.dtype, "corpus": corpus_sha, "format": 1}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def make_optimizer(model, lr: float, weight_decay: float, total_steps: int):
    """AdamW with a linear warm-up (5% of steps) then a half cosine to 0 (transformers' schedule)."""
    from .optim import AdamW, LinearWarmupCosineDecay  # noqa: PLC0415

    opt = AdamW(model, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    sched = LinearWarmupCosineDecay(opt, num_warmup_steps=max(1, total_steps // 20), num_training_steps=total_steps)
    return opt, sched


def evaluate(model, batches: list) -> float:
    """Mean cross-entropy over the fixed eval batches, dropout off, nothing kept for backward."""
    backend = model.backend
    model.eval()
    total, n = 0.0, 0
    for ids in batches:
        x = backend.asarray(ids)
        out = model.forward(x, labels=x)
        w = ids.shape[0] * (ids.shape[1] - 1)  # the shifted targets per batch
        total += _scalar(out.loss) * w
        n += w
        model.clear_cache()
    model.train()
    return total / n


def pretrain_base(cfg: RunConfig, corpus, backend, log: Log) -> tuple[str, dict]:
    """The cached base model's folder (HF layout) and its record; pretrains when not cached."""
    from .model import GPT2LMHeadModel  # noqa: PLC0415
    from .model.hf import save_pretrained  # noqa: PLC0415

    cache_root = cfg.cache_dir or default_cache_dir()
    folder = os.path.join(cache_root, f"base-gpt2-{base_cache_key(cfg, corpus.summary()['sha256'])}")
    record_path = os.path.join(folder, "pretrain.json")
    if os.path.exists(os.path.join(folder, "model.safetensors")) and os.path.exists(record_path):
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
        record.update(cached=True, cache_path=folder, seconds_this_run=0.0)
        log(f"base model: cached at {folder} (pretrained {record['steps']} steps, final loss {record['final_loss']:.3f})")
        return folder, record
    from .train import SeededBatches, Trainer  # noqa: PLC0415

    model = GPT2LMHeadModel(gpt2_config(cfg), backend, seed=cfg.seed)
    model.train()
    opt, sched = make_optimizer(model, cfg.pretrain_lr, 0.0, cfg.pretrain_steps)
    trainer = Trainer(model, opt, sched, max_grad_norm=cfg.max_grad_norm)
    batches = SeededBatches(corpus.tokens, cfg.batch_size, cfg.n_positions, seed=cfg.seed + 1)
    t0 = time.perf_counter()
    losses = []
    with _progress(cfg.pretrain_steps, "pretraining the base", cfg.progress) as bar:
        while trainer.step < cfg.pretrain_steps:
            m = trainer.train_step(batches.batch(trainer.step))
            losses.append(float(m["loss"]))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - t0
    model.clear_cache()
    os.makedirs(cache_root, exist_ok=True)
    tmp = folder + f".tmp{os.getpid()}"
    save_pretrained(model, tmp)
    tail = losses[-max(1, len(losses) // 10):]
    record = {"steps": cfg.pretrain_steps, "seconds": round(seconds, 2), "final_loss": float(np.mean(tail)),
              "loss_curve": [round(v, 4) for v in losses], "params": int(model.num_parameters())}
    with open(os.path.join(tmp, "pretrain.json"), "w", encoding="utf-8") as f:
        json.dump(record, f)
    if os.path.exists(folder):  # a concurrent run finished first: keep theirs
        import shutil  # noqa: PLC0415

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    record.update(cached=False, cache_path=folder, seconds_this_run=round(seconds, 2))
    log(f"base model: pretrained {cfg.pretrain_steps} steps in {seconds:.1f} s, final loss {record['final_loss']:.3f}"
        f" nats/byte; cached at {folder}")
    return folder, record


def load_base(folder: str, backend):
    from .model.hf import load_pretrained  # noqa: PLC0415

    return load_pretrained(folder, backend)


# ------------------------------------------------------------------------------------------------
# Methods: how to build each at a size knob, and matching the budget
# ------------------------------------------------------------------------------------------------
class MethodUnavailable(Exception):
    """A method's code has not landed (or its dependency is missing): reported, not faked."""


def _import(module: str, names: tuple[str, ...], method: str):
    import importlib  # noqa: PLC0415

    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise MethodUnavailable(f"{module} is not importable ({exc})") from None
    missing = [n for n in names if not hasattr(mod, n)]
    if missing:
        raise MethodUnavailable(f"{module} has no {', '.join(missing)}")
    return [getattr(mod, n) for n in names]


def _quantize(model, cfg: RunConfig):
    (quantize_model,) = _import("spectral_peft.quant", ("quantize_model",), "quant")
    quantize_model(model, quant_type=cfg.quant_type, blocksize=cfg.blocksize,
                   compress_statistics=cfg.compress_statistics)  # in place: every dense Linear -> Linear4bit
    return model


def _lora_config(cfg: RunConfig, r: int, **kw):
    (LoraConfig,) = _import("spectral_peft.adapters.lora", ("LoraConfig",), "lora")
    fields_ = {f.name for f in dataclasses.fields(LoraConfig)}
    extra = {k: v for k, v in kw.items() if k in fields_}
    missing = sorted(set(kw) - fields_)
    if missing:
        raise MethodUnavailable(f"LoraConfig has no field(s) {missing}")
    return LoraConfig(r=r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_list(), **extra)


def _rosa_config(cfg: RunConfig, r: int, d: float):
    (RosaConfig,) = _import("spectral_peft.adapters.rosa", ("RosaConfig",), "rosa")
    schedule = cfg.schedule or f"wl{max(1, cfg.steps // 10)}"
    return RosaConfig(r=r, d=d, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_list(), spa_num_grads=cfg.spa_num_grads, schedule=schedule)


def _adalora_config(cfg: RunConfig, init_r: int):
    (AdaLoraConfig,) = _import("spectral_peft.adapters.adalora", ("AdaLoraConfig",), "adalora")
    target_r = cfg.target_r if cfg.target_r is not None else max(1, (2 * init_r) // 3)
    tinit = cfg.tinit if cfg.tinit is not None else max(0, cfg.steps // 10)
    tfinal = cfg.tfinal if cfg.tfinal is not None else max(0, cfg.steps // 5)
    if tinit >= cfg.steps - tfinal and cfg.tinit is None and cfg.tfinal is None:
        tinit, tfinal = 0, 0  # tiny runs with the defaults: keep a budgeting phase
    return AdaLoraConfig(init_r=init_r, target_r=min(target_r, init_r), tinit=tinit, tfinal=tfinal,
                         deltaT=cfg.deltaT, beta1=cfg.beta1, beta2=cfg.beta2, orth_reg_weight=cfg.orth_reg_weight,
                         total_step=cfg.steps, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                         target_modules=cfg.target_list())


# method -> (knob name, kind "int"/"float", config builder(cfg, knob) -> adapter config, quantised base?)
def method_config(method: str, cfg: RunConfig, knob):
    """The adapter config of ``method`` at size ``knob`` (None for full fine-tuning). For the LoRA
    family the knob is r, or (r, rank_pattern) when some modules take r + 1 to meet the budget."""
    if method == "full":
        return None
    r, pattern = knob if isinstance(knob, tuple) else (knob, None)
    pat = {"rank_pattern": pattern} if pattern else {}
    if method in ("lora", "qlora"):
        return _lora_config(cfg, r, **pat)
    if method == "rslora":
        return _lora_config(cfg, r, use_rslora=True, **pat)
    if method == "dora":
        return _lora_config(cfg, r, use_dora=True, **pat)
    if method in ("dylora", "lorafa", "deltalora"):
        return _variant_config(method, cfg, r, pattern)
    if method == "adalora":
        return _adalora_config(cfg, knob)
    if method in ("rosa", "qrosa"):
        return _rosa_config(cfg, rosa_rank(cfg), knob)
    raise ValueError(f"unknown method {method!r}")


VARIANTS = {  # method -> (module, config class, extra fields taken from RunConfig)
    "dylora": ("spectral_peft.adapters.dylora", "DyLoraConfig", ("dylora_mode",)),
    "lorafa": ("spectral_peft.adapters.lorafa", "LoraFAConfig", ()),
    "deltalora": ("spectral_peft.adapters.deltalora", "DeltaLoraConfig", ("delta_lambda", "delta_start_step")),
}


def _variant_config(method: str, cfg: RunConfig, r: int, rank_pattern: dict | None = None):
    """DyLoRA / LoRA-FA / Delta-LoRA: LoraConfig subclasses of the lora family."""
    module, cls_name, extra = VARIANTS[method]
    (cls,) = _import(module, (cls_name,), method)
    kw = {name: getattr(cfg, name) for name in extra}
    if rank_pattern:
        kw["rank_pattern"] = rank_pattern
    return cls(r=r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0 if method == "deltalora" else cfg.lora_dropout,
               target_modules=cfg.target_list(), **kw)


def rosa_rank(cfg: RunConfig) -> int:
    return cfg.rosa_r if cfg.rosa_r is not None else max(1, cfg.r // 2)


def build_method(method: str, cfg: RunConfig, base_folder: str, backend, knob, quantize: bool = True):
    """A fresh base loaded from the cache, (quantised,) with ``method``'s adapters at ``knob``.
    Returns (model, adapter config or None). ``quantize=False`` skips the 4-bit base (counting
    trainable parameters does not need it)."""
    model = load_base(base_folder, backend)
    if method in ("qlora", "qrosa") and quantize:
        model = _quantize(model, cfg)
    conf = method_config(method, cfg, knob)
    if conf is None:
        model.train()
        return model, None
    from .adapters.peft_model import get_peft_model  # noqa: PLC0415

    peft = get_peft_model(model, conf, seed=cfg.seed)
    peft.train()
    return peft, conf


def trainable_count(model) -> int:
    """Trainable parameters, with RoSA's sparse values counted at their final size (nnz) even
    before the support is chosen, as peft-rosa's budget is stated."""
    n = model.num_parameters(trainable_only=True)
    for _, m in model.named_modules():
        if hasattr(m, "adapter_parameter_count") and hasattr(m, "base_layer"):
            own = sum(int(v.size) for k, v in m.params.items() if k not in m.frozen)
            n += int(m.adapter_parameter_count()) - own
    return int(n)


LORA_FAMILY = ("lora", "rslora", "dora", "dylora", "lorafa", "deltalora", "qlora")


def match_budget(method: str, cfg: RunConfig, base_folder: str, backend, budget: int) -> tuple:
    """The size knob whose trainable count is nearest ``budget``: (knob, count).

    Integer ranks first (the count grows with r); when the nearest r is off by more than the
    tolerance (DoRA's magnitudes, LoRA-FA's B-only count), the LoRA family gives r + 1 to some
    modules through PEFT's rank_pattern, largest steps first, while that brings the count closer.
    RoSA: LoRA at rosa_r plus the density d that fills the rest (peft-rosa's int(d·numel) per layer).
    """
    cache: dict = {}

    def count(knob):
        key = json.dumps(knob, sort_keys=True, default=str)
        if key not in cache:
            model, _ = build_method(method, cfg, base_folder, backend, knob, quantize=False)
            cache[key] = trainable_count(model)
        return cache[key]

    if method in ("rosa", "qrosa"):
        if cfg.d is not None:
            return cfg.d, count(cfg.d)
        nnz_for, rosa_parameter_count = _import("spectral_peft.adapters.rosa", ("nnz_for", "rosa_parameter_count"),
                                                method)
        from .adapters.base import match_target_modules  # noqa: PLC0415

        base = load_base(base_folder, backend)
        shapes = [(base.get_submodule(p).d_out, base.get_submodule(p).d_in)
                  for p in match_target_modules(base, cfg.target_list())]
        r = rosa_rank(cfg)
        numel = sum(a * b for a, b in shapes)
        d = max(0.0, (budget - rosa_parameter_count(shapes, r, 0.0)) / numel)
        # int(d·numel) floors per layer: nudge d up while that brings the count nearer the budget.
        while d < 1.0 and abs(rosa_parameter_count(shapes, r, d + 0.5 / numel) - budget) < \
                abs(rosa_parameter_count(shapes, r, d) - budget):
            d += 0.5 / numel
        if d <= 0.0:
            raise MethodUnavailable(f"RoSA's LoRA part at r={r} already exceeds the budget {budget:,}; lower --rosa_r")
        d = float(min(d, 1.0))
        return d, count(d)
    if method == "adalora" and cfg.init_r is not None:
        return cfg.init_r, count(cfg.init_r)
    lo, hi = 1, max(8 * cfg.r, 16)
    while lo < hi:  # smallest r with count(r) >= budget
        mid = (lo + hi) // 2
        if count(mid) >= budget:
            hi = mid
        else:
            lo = mid + 1
    candidates = [k for k in (lo - 1, lo) if k >= 1]
    best = min(candidates, key=lambda k: (abs(count(k) - budget), k))
    if abs(count(best) - budget) <= cfg.tolerance * budget or method not in LORA_FAMILY or lo - 1 < 1:
        return best, count(best)
    # mixed ranks: start from r = lo - 1 (below the budget) and raise modules to lo
    r = lo - 1
    model_lo, _ = build_method(method, cfg, base_folder, backend, r, quantize=False)
    model_hi, _ = build_method(method, cfg, base_folder, backend, r + 1, quantize=False)
    per_lo = {_model_path(p): trainable_count(m) for p, m in model_lo.adapter_layers()}
    per_hi = {_model_path(p): trainable_count(m) for p, m in model_hi.adapter_layers()}
    steps = sorted(((per_hi[p] - per_lo[p], p) for p in per_lo), reverse=True)
    total, pattern = count(r), {}
    for delta, path in steps:
        if abs(total + delta - budget) < abs(total - budget):
            pattern[path] = r + 1  # PEFT matches keys as (.*\.)?(key)$: the full path is exact
            total += delta
    knob = (r, pattern) if pattern else r
    return knob, count(knob)


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------
def frozen_weight_bytes(model) -> int:
    """Bytes of every frozen parameter; a quantised linear reports its packed codes and statistics
    through ``weight_bytes()``."""
    total, seen = 0, set()
    for _, m in model.named_modules():
        quant = hasattr(m, "weight_bytes") and callable(m.weight_bytes)
        if quant:
            total += int(m.weight_bytes())
        for k, p in m.params.items():
            if k not in m.frozen or id(p) in seen or (quant and k == "weight"):
                continue
            seen.add(id(p))
            total += int(p.nbytes)
    return int(total)


def _median_ms(times_ms: list[float]) -> float:
    tail = times_ms[2:] if len(times_ms) > 4 else times_ms  # the first steps pay one-time costs
    return float(np.median(tail)) if tail else 0.0


def train_method(method: str, model, cfg: RunConfig, train_tokens, eval_sets, log: Log) -> dict:
    """Fine-tune ``model`` for cfg.steps steps with the engine's Trainer (PEFT's call order);
    returns the measured record (MethodResult fields)."""
    from .train import SeededBatches, Trainer  # noqa: PLC0415

    lr = cfg.full_lr if method == "full" else cfg.lr
    opt, sched = make_optimizer(model, lr, cfg.weight_decay, cfg.steps)
    trainer = Trainer(model, opt, sched, max_grad_norm=cfg.max_grad_norm)
    controllers = trainer.controllers
    batches = SeededBatches(train_tokens, cfg.batch_size, cfg.n_positions, seed=cfg.seed + 2)  # same for all
    train_curve = {"step": [], "loss": [], "d2h": [], "h2d": []}
    eval_curve = {"step": [0], "loss": [evaluate(model, eval_sets)]}
    extras: dict = {}
    with _progress(cfg.steps, f"{method:>9}", cfg.progress) as bar:
        while trainer.step < cfg.steps:
            m = trainer.train_step(batches.batch(trainer.step))
            step = trainer.step
            train_curve["step"].append(step)
            train_curve["loss"].append(round(float(m["loss"]), 5))
            train_curve["d2h"].append(m["d2h"])  # device-to-host syncs and host-to-device copies
            train_curve["h2d"].append(m["h2d"])
            if step % cfg.eval_every == 0 or step == cfg.steps:
                eval_curve["step"].append(step)
                eval_curve["loss"].append(evaluate(model, eval_sets))
                record_snapshot(method, model, controllers, step, extras)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3f}")
            if any(getattr(c, "should_stop", False) for c in controllers):
                break
    if eval_curve["step"][-1] != trainer.step:
        eval_curve["step"].append(trainer.step)
        eval_curve["loss"].append(evaluate(model, eval_sets))
    record_final(method, model, controllers, cfg, extras)
    if method == "dylora":  # DyLoRA's promise: one run, usable at every rank 1..r_max
        (loss_by_rank,) = _import("spectral_peft.adapters.dylora", ("loss_by_rank",), method)
        by_rank = loss_by_rank(model, lambda: evaluate(model, eval_sets))
        extras["rank_eval"] = {"ranks": sorted(by_rank), "losses": [by_rank[b] for b in sorted(by_rank)]}
    times = [h["ms"] for h in trainer.history if not h["skipped"]]
    return {
        "trainable_params": trainable_count(model),
        "frozen_weight_bytes": frozen_weight_bytes(model),
        "peak_activation_bytes": int(max((h["activation_bytes"] for h in trainer.history), default=0)),
        "ms_per_step": round(_median_ms(times), 3),
        "final_eval_loss": float(eval_curve["loss"][-1]),
        "train_curve": train_curve,
        "eval_curve": {"step": eval_curve["step"], "loss": [float(v) for v in eval_curve["loss"]]},
        "extras": extras,
    }


def _layer_ranks(model) -> dict:
    """{layer path: kept rank} of every AdaLoRA layer (its pattern, or its full rank)."""
    out = {}
    for path, m in model.adapter_layers():
        pattern = getattr(m, "pattern", None)
        if "lora_E" in m.params:
            out[_short(path)] = int(sum(pattern)) if pattern is not None else int(m.params["lora_E"].shape[0])
    return out


def _model_path(path: str) -> str:
    """A PeftModel path relative to the wrapped model (PEFT's rank_pattern keys)."""
    return path.replace("base_model.model.", "", 1)


def _short(path: str) -> str:
    return path.replace("base_model.model.", "").replace("transformer.", "")


def record_snapshot(method: str, model, controllers, step: int, extras: dict) -> None:
    """Per-eval-point records the figures need (AdaLoRA: the rank of every layer over time)."""
    if method == "adalora":
        extras.setdefault("rank_history", []).append({"step": step, "ranks": _layer_ranks(model)})


def _delta_weight(layer):
    """The dense ΔW (d_out, d_in) an adapter layer adds to its base, or None when not available."""
    for name in ("delta_weight", "get_delta_weight"):
        fn = getattr(layer, name, None)
        if callable(fn):
            try:
                return to_host(fn())
            except TypeError:
                continue
    try:
        return to_host(layer.effective_weight()) - to_host(layer.base_layer.effective_weight())
    except (AttributeError, NotImplementedError):
        return None


def record_final(method: str, model, controllers, cfg: RunConfig, extras: dict) -> None:
    """Method-specific end-of-run records: singular values of ΔW, AdaLoRA's schedule and final
    ranks, RoSA's densities."""
    layers = model.adapter_layers() if hasattr(model, "adapter_layers") else []
    sv = {}
    for path, layer in layers:
        dw = _delta_weight(layer)
        if dw is not None and dw.ndim == 2:
            s = np.linalg.svd(dw.astype(np.float64), compute_uv=False)
            sv[_short(path)] = [float(v) for v in s[:32]]
    if sv:
        extras["singular_values"] = sv
    if method == "adalora":
        extras["final_ranks"] = _layer_ranks(model)
        c = controllers[0] if controllers else None
        pattern = c.rank_pattern() if c is not None and hasattr(c, "rank_pattern") else None
        if pattern is None:  # no masking happened (a tiny run): every triplet is kept
            pattern = {f"{_model_path(p)}.lora_E": [True] * int(m.params["lora_E"].shape[0])
                       for p, m in layers if "lora_E" in m.params}
        extras["rank_pattern"] = {k: [bool(b) for b in v] for k, v in pattern.items()}
        extras["lora_E"] = {_short(p): [float(v) for v in to_host(m.params["lora_E"]).reshape(-1)]
                            for p, m in layers if "lora_E" in m.params}
        if c is not None and hasattr(c, "allocator"):
            alloc = c.allocator
            extras["budget_schedule"] = {
                # the loop's step numbers, 0-based, as the controller sees them
                "step": list(range(cfg.steps)),
                "budget": [int(alloc.budget_schedule(t)[0]) for t in range(cfg.steps)],
                "init_bgt": int(alloc.init_bgt), "target_bgt": int(alloc.target_bgt),
                "masked": [[int(a), int(b), int(k)] for a, b, k in getattr(c, "history", [])],
            }
    if method in ("rosa", "qrosa"):
        dens, support = {}, None
        for path, layer in layers:
            if not (hasattr(layer, "nnz") and hasattr(layer, "shape")):
                continue
            do, di = layer.shape
            mask = layer.support_mask() if callable(getattr(layer, "support_mask", None)) else None
            nnz = int(to_host(mask).sum()) if mask is not None else int(layer.nnz)
            dens[_short(path)] = {"nnz": nnz, "shape": [int(do), int(di)], "density": nnz / float(do * di)}
            if mask is not None and (support is None or nnz > support["nnz"]):
                flat = np.flatnonzero(to_host(mask).reshape(-1))
                support = {"layer": _short(path), "shape": [int(do), int(di)], "nnz": nnz,
                           "indices": [int(v) for v in flat]}
        extras["density"] = dens
        if support is not None:
            extras["support"] = support


def quantization_record(base_folder: str, cfg: RunConfig) -> dict:
    """Codebooks and per-layer error of 4-bit quantisation of the base's linears (for the NF4
    figure), or {"unavailable": reason}."""
    try:
        quantize_4bit, dequantize_4bit = _import("spectral_peft.quant", ("quantize_4bit", "dequantize_4bit"), "quant")
    except MethodUnavailable as exc:
        return {"unavailable": str(exc)}
    try:
        (get_4bit_code,) = _import("spectral_peft.quant.codebooks", ("get_4bit_code",), "quant")
        rec: dict = {"codebooks": {qt: [float(v) for v in np.asarray(get_4bit_code(qt)).reshape(-1)]
                                   for qt in ("nf4", "fp4")}}
    except MethodUnavailable:
        rec = {"codebooks": {}}
    backend = get_backend("cpu", "float32")
    model = load_base(base_folder, backend)
    errors = {}
    for path, m in model.named_modules():
        if type(m).__name__ != "Linear":
            continue
        W = np.asarray(m.params["weight"], dtype=np.float32)
        row = {}
        for qt in ("nf4", "fp4"):
            try:
                packed, state = quantize_4bit(W, quant_type=qt, blocksize=cfg.blocksize, compress_statistics=False)
                Wq = np.asarray(to_host(dequantize_4bit(packed, state)), dtype=np.float32).reshape(W.shape)
            except Exception as exc:  # the quant API differs from the map: say so, once
                return {"unavailable": f"quantize_4bit/dequantize_4bit failed: {type(exc).__name__}: {exc}",
                        **rec}
            err = Wq - W
            row[qt] = {"rmse": float(np.sqrt(np.mean(err ** 2))), "max_abs": float(np.abs(err).max()),
                       "rel_fro": float(np.linalg.norm(err) / np.linalg.norm(W))}
        errors[_short(path)] = row
    rec["layer_error"] = errors
    # the normalised weights of one layer, to show against the codebook
    first = next((m for _, m in model.named_modules() if type(m).__name__ == "Linear"), None)
    if first is not None:
        W = np.asarray(first.params["weight"], dtype=np.float32).reshape(-1)
        n = W.size // cfg.blocksize * cfg.blocksize
        blocks = W[:n].reshape(-1, cfg.blocksize)
        normed = blocks / np.abs(blocks).max(axis=1, keepdims=True)
        hist, edges = np.histogram(normed, bins=64, range=(-1, 1))
        rec["normalized_histogram"] = {"counts": [int(v) for v in hist], "edges": [float(v) for v in edges]}
    return rec


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
TABLE_COLUMNS = ("method", "trainable params", "vs budget", "frozen-weight bytes", "peak activation bytes",
                 "ms/step", "final eval loss")


def format_table(results: dict) -> str:
    budget = results["budget"].get("target") or 0
    rows = []
    for m in results["methods"]:
        vs = "(reference)" if m["method"] == "full" else f"{(m['trainable_params'] - budget) / budget:+.1%}"
        rows.append((m["method"], f"{m['trainable_params']:,}", vs, f"{m['frozen_weight_bytes']:,}",
                     f"{m['peak_activation_bytes']:,}", f"{m['ms_per_step']:.1f}", f"{m['final_eval_loss']:.4f}"))
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(TABLE_COLUMNS)]
    line = "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(TABLE_COLUMNS, widths)))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def _timestamp_folder(root: str) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = os.path.join(root, stamp)
    k = 1
    while os.path.exists(folder):
        folder = os.path.join(root, f"{stamp}-{k}")
        k += 1
    os.makedirs(folder)
    return folder


def _point_latest(root: str, folder: str) -> None:
    link = os.path.join(root, "latest")
    tmp = link + f".tmp{os.getpid()}"
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.path.basename(folder), tmp)
        os.replace(tmp, link)
    except OSError:  # no symlinks (some filesystems): write the folder's name instead
        if os.path.lexists(link) and not os.path.isdir(link):
            os.unlink(link)
        with open(link + ".txt", "w", encoding="utf-8") as f:
            f.write(os.path.basename(folder) + "\n")


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------
def _limit_threads(n: int):
    """A context limiting BLAS to ``n`` threads (threadpoolctl); n = 0: no limit."""
    if n <= 0:
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def run(cfg: RunConfig, log: Log | None = None) -> tuple[dict, str]:
    """The whole job; returns (results, run folder)."""
    with _limit_threads(cfg.threads):
        return _run(cfg, log)


def _run(cfg: RunConfig, log: Log | None = None) -> tuple[dict, str]:
    log = log or Log()
    t_start = time.perf_counter()
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    backend = get_backend(cfg.device, cfg.dtype)
    results = new_results(created, dataclasses.asdict(cfg))
    folder = _timestamp_folder(cfg.out)
    timing = results["timing"]

    # 1. data
    t0 = time.perf_counter()
    pre = data_mod.pretrain_corpus()
    ft_train, ft_eval = data_mod.finetune_corpora()
    eval_sets = data_mod.eval_batches(ft_eval.tokens, cfg.batch_size, cfg.n_positions, cfg.eval_batches)
    results["data"] = {"tokenizer": "UTF-8 bytes (vocabulary 256)", "pretrain": pre.summary(),
                       "finetune_train": ft_train.summary(), "finetune_eval": ft_eval.summary(),
                       "eval_windows": int(sum(b.shape[0] for b in eval_sets))}
    timing["data_s"] = round(time.perf_counter() - t0, 2)
    py = f"Python {sys.version.split()[0]}"
    log(f"data: pretraining on the source code (docstrings removed) of {len(pre.modules)} standard-library modules "
        f"of {py}: {pre.summary()['bytes']:,} bytes, sha256 {pre.summary()['sha256'][:12]}")
    log(f"      ({', '.join(pre.modules)})")
    log(f"data: fine-tuning on the docstrings of {len(ft_train.modules)} other modules: "
        f"{ft_train.summary()['bytes']:,} bytes train, {ft_eval.summary()['bytes']:,} bytes held out "
        f"(every {data_mod.EVAL_EVERY}th docstring); eval on {results['data']['eval_windows']} windows of "
        f"{cfg.n_positions} bytes")

    log(f"compute: {cfg.device} {cfg.dtype}, seed {cfg.seed}, BLAS threads "
        f"{cfg.threads if cfg.threads > 0 else 'as configured'}; output in {folder}")

    # 2. base model
    t0 = time.perf_counter()
    base_folder, record = pretrain_base(cfg, pre, backend, log)
    base = load_base(base_folder, backend)
    base_eval = evaluate(base, eval_sets)
    results["base_model"] = {"config": {"vocab_size": 256, "n_positions": cfg.n_positions, "n_embd": cfg.n_embd,
                                        "n_layer": cfg.n_layer, "n_head": cfg.n_head},
                             "params": int(base.num_parameters()), "pretrain": record, "eval_loss": base_eval}
    timing["pretrain_s"] = round(time.perf_counter() - t0, 2)
    log(f"base model: GPT-2, {cfg.n_layer} layers, d_model {cfg.n_embd}, {cfg.n_head} heads, T {cfg.n_positions}, "
        f"{results['base_model']['params']:,} parameters; eval loss before fine-tuning {base_eval:.4f}")
    del base

    # 3. budget
    budget = cfg.budget
    if budget is None:
        try:
            budget = trainable_count(build_method("lora", cfg, base_folder, backend, cfg.r)[0])
        except MethodUnavailable as exc:
            budget = _lora_formula(base_folder, backend, cfg)
            log(f"budget: LoRA is not available ({exc}); using the LoRA formula r·(d_in + d_out)")
    results["budget"] = {"target": int(budget), "tolerance": cfg.tolerance,
                         "rule": f"LoRA r={cfg.r} on {cfg.target_modules}" if cfg.budget is None else "--budget"}
    log(f"budget: {budget:,} trainable parameters ({results['budget']['rule']}), every method within "
        f"{cfg.tolerance:.0%} (full fine-tuning is the unmatched reference)")

    # 4. methods
    timing["methods_s"] = {}
    for method in cfg.method_list():
        t0 = time.perf_counter()
        try:
            knob, count = (None, None) if method == "full" else match_budget(method, cfg, base_folder, backend, budget)
            model, conf = build_method(method, cfg, base_folder, backend, knob)
        except MethodUnavailable as exc:
            results["unavailable"].append({"method": method, "reason": str(exc)})
            log(f"method {method}: not available: {exc}")
            continue
        if method != "full" and abs(count - budget) > cfg.tolerance * budget:
            reason = (f"its nearest size ({_knob_text(method, knob)}) has {count:,} trainable parameters, "
                      f"{(count - budget) / budget:+.1%} from the budget {budget:,}")
            results["unavailable"].append({"method": method, "reason": reason})
            log(f"method {method}: not run: {reason}")
            continue
        settings = _settings(method, conf, knob)
        rec = train_method(method, model, cfg, ft_train.tokens, eval_sets, log)
        seconds = time.perf_counter() - t0
        timing["methods_s"][method] = round(seconds, 2)
        results["methods"].append({"method": method, "settings": settings, **rec})
        log(f"method {method:>9}: {_knob_text(method, knob):<22} trainable {rec['trainable_params']:>9,}  "
            f"eval loss {rec['final_eval_loss']:.4f}  {rec['ms_per_step']:.1f} ms/step  ({seconds:.1f} s)")
        del model

    # 5. results, figures
    results["quantization"] = quantization_record(base_folder, cfg)  # the NF4/FP4 figure's data
    results_path = os.path.join(folder, RESULTS_FILE)
    t0 = time.perf_counter()
    if cfg.figures:
        from .figures import make_figures  # noqa: PLC0415

        results["figures"], skipped = make_figures(results, folder)
        for line in skipped:
            log(f"figure {line}")
    timing["figures_s"] = round(time.perf_counter() - t0, 2)
    timing["total_s"] = round(time.perf_counter() - t_start, 2)
    save_results(results, results_path)
    _point_latest(cfg.out, folder)
    log("")
    log(format_table(results))
    for u in results["unavailable"]:
        log(f"method {u['method']}: not available: {u['reason']}")
    log("")
    per = ", ".join(f"{k} {v:.1f}" for k, v in timing["methods_s"].items())
    log(f"time: data {timing['data_s']:.1f} s, base model {timing['pretrain_s']:.1f} s, methods "
        f"{sum(timing['methods_s'].values()):.1f} s ({per}), figures {timing['figures_s']:.1f} s; "
        f"total {timing['total_s']:.1f} s")
    log(f"results: {results_path}")
    if results["figures"]:
        log(f"figures: {len(results['figures'])} files in {folder}")
    return results, folder


def _lora_formula(base_folder: str, backend, cfg: RunConfig) -> int:
    from .adapters.base import match_target_modules  # noqa: PLC0415

    model = load_base(base_folder, backend)
    paths = match_target_modules(model, cfg.target_list())
    return int(sum(cfg.r * (model.get_submodule(p).d_in + model.get_submodule(p).d_out) for p in paths))


def _knob_text(method: str, knob) -> str:
    if isinstance(knob, tuple):
        return f"r={knob[0]}/{knob[0] + 1} ({len(knob[1])} at r+1)"
    if method == "full":
        return "all weights"
    if method in ("rosa", "qrosa"):
        return f"d={knob:.4%}"
    if method == "adalora":
        return f"init_r={knob}"
    return f"r={knob}"


def _settings(method: str, conf, knob) -> dict:
    if conf is None:
        return {"method": method}
    try:
        d = conf.to_json_dict()
    except Exception:  # a config without a file form: its dataclass fields
        d = dataclasses.asdict(conf) if dataclasses.is_dataclass(conf) else {}
    return json.loads(json.dumps(d, default=str))


def precheck_methods(cfg: RunConfig) -> None:
    """Build every chosen method's adapter config once (no model needed), so a bad method option
    (a RoSA --schedule, a --dylora_mode, AdaLoRA's --tinit/--tfinal) fails before any work."""
    for method in cfg.method_list():
        if method == "full":
            continue
        knob = {"rosa": cfg.d or 0.01, "qrosa": cfg.d or 0.01, "adalora": cfg.init_r or cfg.r}.get(method, cfg.r)
        try:
            method_config(method, cfg, knob)
        except MethodUnavailable:
            continue  # reported in the run, with the reason
        except (TypeError, ValueError) as exc:
            raise ValueError(f"method {method}: {exc}") from None


def main(args) -> int:
    try:
        cfg = config_from_args(args)
        precheck_methods(cfg)
    except ValueError as exc:
        print(f"spectral-peft run: error: {exc}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except (ImportError, MethodUnavailable) as exc:
        print(f"spectral-peft run: error: the base model cannot be built: {exc}", file=sys.stderr)
        return 1
    return 0
